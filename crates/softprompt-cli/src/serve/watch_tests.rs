//! The adapters folder's watcher on the real SmolLM2 and the PEFT fixture adapters: a new
//! folder is served once it has settled, a changed one is reloaded, a half-written one is never
//! served (the version before stays), a removed one is unloaded.

use super::tests::{copy_adapter, model};
use super::watch::Watcher;
use super::*;
use softprompt::adapter::ADAPTER_WEIGHTS;
use std::sync::RwLock;

/// The first value of `name`'s prompt keys, to tell two versions of an adapter apart.
fn first_key(adapters: &RwLock<BTreeMap<String, Served>>, name: &str) -> Option<f32> {
    let served = adapters.read().unwrap().get(name)?.clone();
    let cache = served.prompt(None).ok()?;
    let k = cache.cache.layers[0].0.flatten_all().ok()?;
    k.get(0).ok()?.to_scalar::<f32>().ok()
}

#[test]
fn the_watcher_loads_settled_folders_reloads_changes_and_unloads_removed_ones() {
    let m = model();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let adapters = RwLock::new(BTreeMap::new());
    let mut watcher = Watcher::new(dir, "smollm2");
    let load = |name: &str| load_adapter(&m, dir, name);

    // A new folder: seen once (it may still be copied), then loaded.
    copy_adapter("smollm2_prompt_tuning_text", &dir.join("a"));
    assert!(watcher.step(&adapters, load).is_empty());
    assert!(adapters.read().unwrap().is_empty());
    assert_eq!(watcher.step(&adapters, load), ["adapter `a` loaded"]);
    let before = first_key(&adapters, "a").unwrap();
    assert!(
        watcher.step(&adapters, load).is_empty(),
        "an unchanged folder is left alone"
    );

    // Replaced by another adapter: reloaded once settled.
    copy_adapter("smollm2_prompt_tuning_random", &dir.join("a"));
    assert!(watcher.step(&adapters, load).is_empty());
    assert_eq!(first_key(&adapters, "a"), Some(before), "served before it settled");
    assert_eq!(watcher.step(&adapters, load), ["adapter `a` reloaded"]);
    let after = first_key(&adapters, "a").unwrap();
    assert_ne!(after, before);

    // Half-written weights (a copy that stopped): refused once, the version before stays.
    let weights = dir.join("a").join(ADAPTER_WEIGHTS);
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    assert!(watcher.step(&adapters, load).is_empty());
    let said = watcher.step(&adapters, load);
    assert_eq!(said.len(), 1, "{said:?}");
    assert!(
        said[0].starts_with("adapter `a` not loaded: ")
            && said[0].ends_with("the version loaded before is still served"),
        "{said:?}"
    );
    assert_eq!(first_key(&adapters, "a"), Some(after));
    assert!(watcher.step(&adapters, load).is_empty(), "a failure is said once");
    std::fs::write(&weights, &bytes).unwrap();
    watcher.step(&adapters, load);
    assert_eq!(watcher.step(&adapters, load), ["adapter `a` reloaded"]);

    // A folder named like the base model is refused; hidden and non-adapter folders are ignored.
    copy_adapter("smollm2_prompt_tuning_text", &dir.join("smollm2"));
    copy_adapter("smollm2_prompt_tuning_text", &dir.join(".a.softprompt-new-1"));
    std::fs::create_dir_all(dir.join("notes")).unwrap();
    watcher.step(&adapters, load);
    let said = watcher.step(&adapters, load);
    assert_eq!(
        said,
        ["adapter folder `smollm2` is named like the base model; not served"]
    );
    assert_eq!(adapters.read().unwrap().keys().collect::<Vec<_>>(), ["a"]);

    // Removed: unloaded at the next scan.
    std::fs::remove_dir_all(dir.join("a")).unwrap();
    assert_eq!(
        watcher.step(&adapters, load),
        ["adapter `a` unloaded: its folder is gone"]
    );
    assert!(adapters.read().unwrap().is_empty());
}
