//! Rotary position encoding's frequencies and how long-context models scale them.
//!
//! Frequency `i` of a head of size `d` is `f_i = 1 / θ^(2i/d)` (θ = `rope_theta`). Scalings:
//! - `linear` (transformers' `linear`): every `f_i / factor` (positions divided by `factor`);
//! - `llama3` (Llama 3.1/3.2): with the wavelength `λ_i = 2π / f_i`, the original context
//!   `L` and `low`/`high` frequency factors, `f_i` is kept where `λ_i < L / high`, divided by
//!   `factor` where `λ_i > L / low`, and in between interpolated:
//!   `s = (L/λ_i − low) / (high − low)`, `f_i ← (1 − s)·f_i/factor + s·f_i`;
//! - per-frequency divisors (a GGUF's `rope_freqs.weight`, which llama.cpp writes for Llama 3):
//!   `f_i / divisor_i`.
//!
//! Any other type (`yarn`, `dynamic`, `longrope`, ...) is refused by name: a model whose
//! positions are encoded differently would load and silently give other numbers.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

/// How a model scales its rotary frequencies.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum RopeScaling {
    /// The plain frequencies.
    #[default]
    None,
    /// Every frequency divided by `factor`.
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        /// Divisor of the low frequencies.
        factor: f64,
        /// Wavelengths above `original_max_positions / low_freq_factor` are divided by `factor`.
        low_freq_factor: f64,
        /// Wavelengths below `original_max_positions / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The context length the model was first trained with.
        original_max_positions: f64,
    },
    /// One divisor per frequency (a GGUF's `rope_freqs.weight`).
    Divisors(Vec<f32>),
}

impl RopeScaling {
    /// In words, for `softprompt info` (`None` for the plain frequencies).
    pub fn describe(&self) -> Option<String> {
        match self {
            RopeScaling::None => None,
            RopeScaling::Linear { factor } => Some(format!("rotary scaling linear (factor {factor})")),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_positions,
            } => Some(format!(
                "rotary scaling llama3 (factor {factor}, low_freq_factor {low_freq_factor}, \
                 high_freq_factor {high_freq_factor}, original context {original_max_positions})"
            )),
            RopeScaling::Divisors(d) => Some(format!(
                "rotary scaling by the file's {} per-frequency divisors",
                d.len()
            )),
        }
    }

    /// The scaling a Hugging Face `config.json` declares: its `rope_scaling` object (or
    /// transformers 5's `rope_parameters`), with the type under `rope_type` or `type`. `path`
    /// names the file in errors.
    pub fn from_hf_config(config: &Value, path: &Path) -> Result<Self> {
        let (key, value) = match (config.get("rope_scaling"), config.get("rope_parameters")) {
            (Some(v), _) if !v.is_null() => ("rope_scaling", v),
            (_, Some(v)) if !v.is_null() => ("rope_parameters", v),
            _ => return Ok(Self::None),
        };
        let shown = || format!("{}: `{key}`", path.display());
        let kind = value
            .get("rope_type")
            .or_else(|| value.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let number = |name: &str| -> Result<f64> {
            value
                .get(name)
                .and_then(Value::as_f64)
                .with_context(|| format!("{}: `{name}` (a number) is missing", shown()))
        };
        let scaling = match kind {
            "default" => Self::None,
            "linear" => Self::Linear {
                factor: number("factor")?,
            },
            "llama3" => Self::Llama3 {
                factor: number("factor")?,
                low_freq_factor: number("low_freq_factor")?,
                high_freq_factor: number("high_freq_factor")?,
                original_max_positions: number("original_max_position_embeddings")?,
            },
            other => bail!(
                "{}: rope type `{other}` is not supported (supported: default, linear, llama3); \
                 loading it without would encode positions differently from the model's training",
                shown()
            ),
        };
        scaling.checked(&shown())
    }

    /// The scaling a GGUF file's metadata declares (`{arch}.rope.scaling.type` and `.factor`),
    /// given its `rope_freqs.weight` divisors if it has them.
    pub fn from_gguf(kind: Option<&str>, factor: Option<f64>, divisors: Option<Vec<f32>>, path: &Path) -> Result<Self> {
        let shown = || format!("{}: `rope.scaling.type`", path.display());
        let scaling = match (kind.unwrap_or("none"), divisors) {
            ("none", Some(d)) => Self::Divisors(d),
            ("none", None) => Self::None,
            ("linear", None) => Self::Linear {
                factor: factor.with_context(|| format!("{}: `rope.scaling.factor` is missing", shown()))?,
            },
            (other, _) => bail!(
                "{}: rope scaling `{other}`{} is not supported (supported: none, linear, and \
                 llama.cpp's per-frequency `rope_freqs`)",
                shown(),
                if other == "linear" {
                    " together with rope_freqs"
                } else {
                    ""
                }
            ),
        };
        scaling.checked(&shown())
    }

    /// Refuses factors that are not finite and positive, naming `what`.
    fn checked(self, what: &str) -> Result<Self> {
        let ok = |x: f64| x.is_finite() && x > 0.0;
        let fine = match &self {
            Self::None => true,
            Self::Linear { factor } => ok(*factor),
            Self::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_positions,
            } => {
                ok(*factor) && ok(*low_freq_factor) && ok(*original_max_positions) && high_freq_factor > low_freq_factor
            }
            Self::Divisors(d) => d.iter().all(|&x| ok(x as f64)),
        };
        if !fine {
            bail!("{what}: factors must be finite and positive (and high_freq_factor > low_freq_factor): {self:?}");
        }
        Ok(self)
    }

    /// The `head_dim / 2` rotary frequencies for base `theta`, scaled.
    pub fn frequencies(&self, theta: f64, head_dim: usize) -> Result<Vec<f32>> {
        let half = head_dim / 2;
        let plain = (0..half).map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64) as f32);
        Ok(match self {
            Self::None => plain.collect(),
            Self::Linear { factor } => plain.map(|f| (f as f64 / factor) as f32).collect(),
            Self::Llama3 {
                factor,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_positions: context,
            } => plain
                .map(|f| {
                    let f = f as f64;
                    let wavelength = 2.0 * std::f64::consts::PI / f;
                    let scaled = if wavelength < context / high {
                        f
                    } else if wavelength > context / low {
                        f / factor
                    } else {
                        let s = (context / wavelength - low) / (high - low);
                        (1.0 - s) * f / factor + s * f
                    };
                    scaled as f32
                })
                .collect(),
            Self::Divisors(d) => {
                if d.len() != half {
                    bail!(
                        "rope_freqs has {} divisors but the heads have {half} rotary frequencies",
                        d.len()
                    );
                }
                plain.zip(d).map(|(f, &x)| f / x).collect()
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama31() -> RopeScaling {
        let cfg: Value = serde_json::json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}});
        RopeScaling::from_hf_config(&cfg, Path::new("config.json")).unwrap()
    }

    #[test]
    fn llama3_keeps_short_wavelengths_divides_long_ones_and_blends_between() {
        let (theta, hd) = (500_000.0, 128);
        let plain = RopeScaling::None.frequencies(theta, hd).unwrap();
        let scaled = llama31().frequencies(theta, hd).unwrap();
        let mut kinds = [0; 3];
        for (p, s) in plain.iter().zip(&scaled) {
            let wavelength = 2.0 * std::f64::consts::PI / *p as f64;
            if wavelength < 8192.0 / 4.0 {
                assert_eq!(p, s);
                kinds[0] += 1;
            } else if wavelength > 8192.0 {
                assert!((p / 8.0 - s).abs() <= f32::EPSILON * p, "{p} {s}");
                kinds[2] += 1;
            } else {
                assert!(*s < *p && *s > p / 8.0, "{p} {s}");
                kinds[1] += 1;
            }
        }
        assert!(kinds.iter().all(|&k| k > 0), "every band is exercised: {kinds:?}");
        // The blend is continuous at both edges: s = 0 at λ = L/low, s = 1 at λ = L/high.
        let at = |wavelength: f64| {
            let f = 2.0 * std::f64::consts::PI / wavelength;
            let s = (8192.0 / wavelength - 1.0) / 3.0;
            (1.0 - s) * f / 8.0 + s * f
        };
        assert!((at(8192.0) - 2.0 * std::f64::consts::PI / 8192.0 / 8.0).abs() < 1e-15);
        assert!((at(2048.0) - 2.0 * std::f64::consts::PI / 2048.0).abs() < 1e-15);
    }

    #[test]
    fn the_plain_frequencies_are_unchanged_without_scaling() {
        let f = RopeScaling::None.frequencies(10_000.0, 64).unwrap();
        for (i, x) in f.iter().enumerate() {
            assert_eq!(*x, 1.0 / 10_000f64.powf(2.0 * i as f64 / 64.0) as f32);
        }
        let cfg = serde_json::json!({"rope_scaling": null});
        assert_eq!(
            RopeScaling::from_hf_config(&cfg, Path::new("c")).unwrap(),
            RopeScaling::None
        );
        let cfg = serde_json::json!({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}});
        assert_eq!(
            RopeScaling::from_hf_config(&cfg, Path::new("c")).unwrap(),
            RopeScaling::None
        );
    }

    #[test]
    fn linear_and_divisors_divide() {
        let plain = RopeScaling::None.frequencies(10_000.0, 8).unwrap();
        let cfg = serde_json::json!({"rope_scaling": {"type": "linear", "factor": 4.0}});
        let linear = RopeScaling::from_hf_config(&cfg, Path::new("c")).unwrap();
        let div = RopeScaling::from_gguf(None, None, Some(vec![1.0, 2.0, 4.0, 8.0]), Path::new("m.gguf")).unwrap();
        let (l, d) = (
            linear.frequencies(10_000.0, 8).unwrap(),
            div.frequencies(10_000.0, 8).unwrap(),
        );
        for i in 0..4 {
            assert!((l[i] - plain[i] / 4.0).abs() <= f32::EPSILON * plain[i]);
            assert_eq!(d[i], plain[i] / [1.0, 2.0, 4.0, 8.0][i]);
        }
        assert!(div.frequencies(10_000.0, 16).is_err(), "4 divisors for 8 frequencies");
    }

    #[test]
    fn other_types_and_bad_factors_are_refused_by_name() {
        let cfg = serde_json::json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}});
        let e = format!(
            "{:#}",
            RopeScaling::from_hf_config(&cfg, Path::new("config.json")).unwrap_err()
        );
        assert!(e.contains("`yarn`") && e.contains("config.json"), "{e}");
        let cfg = serde_json::json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}});
        let e = format!(
            "{:#}",
            RopeScaling::from_hf_config(&cfg, Path::new("config.json")).unwrap_err()
        );
        assert!(e.contains("low_freq_factor"), "{e}");
        let cfg = serde_json::json!({"rope_scaling": {"type": "linear", "factor": -1.0}});
        assert!(RopeScaling::from_hf_config(&cfg, Path::new("c")).is_err());
        let e = format!(
            "{:#}",
            RopeScaling::from_gguf(Some("yarn"), Some(4.0), None, Path::new("m.gguf")).unwrap_err()
        );
        assert!(e.contains("`yarn`") && e.contains("m.gguf"), "{e}");
    }
}
