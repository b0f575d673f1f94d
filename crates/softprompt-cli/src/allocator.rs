//! The process's allocator told to keep freed memory for reuse.
//!
//! A forward allocates each layer's activations afresh (a few MB each at training shapes) and
//! frees them a layer or a step later. glibc's malloc serves blocks that large from fresh
//! `mmap`s and hands a freed heap top back to the kernel, so every layer page-faults and the
//! kernel zeroes its pages again: about 90,000 faults in three forward + backward passes of
//! the sentiment recipe's batch, a tenth of a training forward. With both thresholds raised,
//! freed blocks stay in the heap for the next layer and step; peak memory does not change.
//! Other platforms and allocators are left as they are.

/// Raises glibc's mmap and trim thresholds (see the module docs), unless the user set either
/// (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`, or `mmap_threshold`/`trim_threshold`
/// in `GLIBC_TUNABLES`). Call it first in `main`, before other threads exist.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        /// Blocks smaller than this come from the heap (glibc's largest allowed value on 64-bit).
        const MMAP_THRESHOLD: libc::c_int = 32 << 20;
        /// Free memory at the heap's top goes back to the kernel only past this much.
        const TRIM_THRESHOLD: libc::c_int = 512 << 20;
        if !thresholds_set_by_user(|name| std::env::var(name).ok()) {
            // SAFETY: mallopt only changes malloc's parameters; no other thread runs yet. A
            // refused value (0 returned) leaves glibc's default, which is only slower.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
                libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
            }
        }
    }
}

/// Whether the environment (read through `var`) already sets glibc's mmap or trim threshold:
/// `MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`, or either key in `GLIBC_TUNABLES`.
#[cfg_attr(not(all(target_os = "linux", target_env = "gnu")), allow(dead_code))]
fn thresholds_set_by_user(var: impl Fn(&str) -> Option<String>) -> bool {
    let set = |name: &str| var(name).is_some_and(|v| !v.is_empty());
    let tunables = var("GLIBC_TUNABLES").unwrap_or_default();
    set("MALLOC_MMAP_THRESHOLD_")
        || set("MALLOC_TRIM_THRESHOLD_")
        || tunables.contains("malloc.mmap_threshold")
        || tunables.contains("malloc.trim_threshold")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
    }

    #[test]
    fn the_user_s_thresholds_win_and_other_tunables_do_not_count() {
        assert!(!thresholds_set_by_user(env(&[])));
        assert!(thresholds_set_by_user(env(&[("MALLOC_MMAP_THRESHOLD_", "1048576")])));
        assert!(thresholds_set_by_user(env(&[("MALLOC_TRIM_THRESHOLD_", "0")])));
        assert!(!thresholds_set_by_user(env(&[("MALLOC_TRIM_THRESHOLD_", "")])));
        let tunables = "glibc.malloc.hugetlb=1:glibc.malloc.trim_threshold=4096";
        assert!(thresholds_set_by_user(env(&[("GLIBC_TUNABLES", tunables)])));
        assert!(!thresholds_set_by_user(env(&[(
            "GLIBC_TUNABLES",
            "glibc.malloc.hugetlb=1"
        )])));
    }
}
