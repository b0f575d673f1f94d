//! Which of a family's two implementations runs a model, chosen once when it loads: the fused
//! f32 CPU kernels (the hot path) or the composed candle ops (any device and dtype; f64 for the
//! finite-difference tests). Nothing after the load looks at the environment again.

use anyhow::{bail, Result};
use candle_core::{DType, Device};

use super::WeightStorage;

/// The environment variable that makes [`KernelPath::Composed`] the default (for comparisons).
pub const COMPOSED_ENV: &str = "SOFTPROMPT_COMPOSED";

/// The two implementations of every architecture family (option `kernels`, `--kernels`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum KernelPath {
    /// Fused multi-threaded f32 kernels on the CPU over the packed real positions
    /// (`llama/fused.rs`, `bert/fused.rs`).
    Fused,
    /// Composed candle tensor ops (`llama/composed.rs`, `bert/composed.rs`): any device and dtype.
    Composed,
}

impl KernelPath {
    /// Whether the fused kernels can run weights of `dtype` on `device`: f32 on the CPU.
    pub fn fused_runs(device: &Device, dtype: DType) -> bool {
        device.is_cpu() && dtype == DType::F32
    }

    /// The path a model of `dtype` on `device` gets when none is asked for: [`KernelPath::Fused`]
    /// where it runs, else [`KernelPath::Composed`]; the environment variable
    /// `SOFTPROMPT_COMPOSED` (set to anything) makes the default composed.
    pub fn default_for(device: &Device, dtype: DType) -> KernelPath {
        Self::default_given(device, dtype, std::env::var_os(COMPOSED_ENV).is_some())
    }

    fn default_given(device: &Device, dtype: DType, composed_env: bool) -> KernelPath {
        if !composed_env && Self::fused_runs(device, dtype) {
            KernelPath::Fused
        } else {
            KernelPath::Composed
        }
    }

    /// The path a model loads with: `requested`, or the default ([`KernelPath::default_for`]).
    /// Refuses the fused path where it cannot run, and weights kept in another storage than
    /// f32 (only the fused kernels read them) on the composed path.
    pub fn choose(
        requested: Option<KernelPath>,
        device: &Device,
        dtype: DType,
        storage: WeightStorage,
    ) -> Result<KernelPath> {
        Self::choose_given(
            requested,
            device,
            dtype,
            storage,
            std::env::var_os(COMPOSED_ENV).is_some(),
        )
    }

    fn choose_given(
        requested: Option<KernelPath>,
        device: &Device,
        dtype: DType,
        storage: WeightStorage,
        composed_env: bool,
    ) -> Result<KernelPath> {
        let path = requested.unwrap_or_else(|| Self::default_given(device, dtype, composed_env));
        if path == KernelPath::Fused {
            Self::check_fused(device, dtype)?;
        } else if storage != WeightStorage::F32 {
            let why = match requested {
                Some(_) => "the composed path was asked for".to_string(),
                None if composed_env => format!("{COMPOSED_ENV} is set"),
                None => format!("the weights are {dtype:?} on {}", device_name(device)),
            };
            bail!(
                "weights = \"{}\" keeps the weights in less memory for the fused CPU kernels; it \
                 needs the fused path (device cpu, f32), but {why}",
                storage.name()
            );
        }
        Ok(path)
    }

    /// Refuses the fused path for weights of `dtype` on `device`, saying why.
    pub fn check_fused(device: &Device, dtype: DType) -> Result<()> {
        if !device.is_cpu() {
            bail!(
                "the fused kernels run on the CPU, not on {}; use the composed path there",
                device_name(device)
            );
        }
        if dtype != DType::F32 {
            bail!("the fused kernels run f32 weights, not {dtype:?}; use the composed path for them");
        }
        Ok(())
    }
}

fn device_name(device: &Device) -> String {
    match device {
        Device::Cpu => "the CPU".into(),
        other => format!("{:?}", other.location()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_fused_for_f32_on_the_cpu_unless_the_variable_is_set() {
        let cpu = Device::Cpu;
        assert_eq!(KernelPath::default_given(&cpu, DType::F32, false), KernelPath::Fused);
        assert_eq!(KernelPath::default_given(&cpu, DType::F32, true), KernelPath::Composed);
        assert_eq!(KernelPath::default_given(&cpu, DType::F64, false), KernelPath::Composed);
    }

    #[test]
    fn an_explicit_path_wins_over_the_variable_and_fused_is_refused_where_it_cannot_run() {
        let (cpu, f32s) = (Device::Cpu, WeightStorage::F32);
        let fused = Some(KernelPath::Fused);
        let got = KernelPath::choose_given(fused, &cpu, DType::F32, f32s, true).unwrap();
        assert_eq!(got, KernelPath::Fused);
        let composed = Some(KernelPath::Composed);
        let got = KernelPath::choose_given(composed, &cpu, DType::F32, f32s, false).unwrap();
        assert_eq!(got, KernelPath::Composed);
        let err = KernelPath::choose_given(fused, &cpu, DType::F64, f32s, false).unwrap_err();
        assert!(err.to_string().contains("f32 weights, not F64"), "{err}");
    }

    #[test]
    fn stored_weights_need_the_fused_path() {
        let cpu = Device::Cpu;
        let file = WeightStorage::File;
        let got = KernelPath::choose_given(None, &cpu, DType::F32, file, false).unwrap();
        assert_eq!(got, KernelPath::Fused);
        let err = KernelPath::choose_given(None, &cpu, DType::F32, file, true).unwrap_err();
        assert!(err.to_string().contains("SOFTPROMPT_COMPOSED is set"), "{err}");
        let composed = Some(KernelPath::Composed);
        let err = KernelPath::choose_given(composed, &cpu, DType::F32, WeightStorage::Q8_0, false).unwrap_err();
        assert!(err.to_string().contains("weights = \"q8_0\""), "{err}");
        assert!(err.to_string().contains("composed path was asked for"), "{err}");
    }
}
