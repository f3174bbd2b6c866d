//! `train.device`: where the model and the optimizer live (`cpu`, `cuda`, `cuda:N`).

use super::TrainError;
use candle_core::Device;

/// What `train.device` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

impl DeviceSpec {
    /// Parses `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
    pub fn parse(spec: &str) -> Result<Self, String> {
        match spec.trim() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            s => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| format!("train.device '{spec}' is not one of cpu, cuda, cuda:N")),
        }
    }

    /// Opens the device. Errors say whether the binary lacks CUDA or the machine lacks a GPU.
    pub fn open(self) -> Result<Device, TrainError> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(ordinal) => {
                if !candle_core::utils::cuda_is_available() {
                    return Err(TrainError::Config(format!(
                        "train.device cuda:{ordinal}: this binary was built without CUDA \
                         (build it with scripts/build-cuda.sh or `cargo build --release -p pipeline --features cuda`)"
                    )));
                }
                Device::new_cuda(ordinal).map_err(|e| {
                    TrainError::Config(format!(
                        "train.device cuda:{ordinal}: no usable CUDA GPU ({e}); is the NVIDIA driver loaded \
                         (nvidia-smi) and are libcudart/libcublas/libcurand/libnvrtc on LD_LIBRARY_PATH?"
                    ))
                })
            }
        }
    }

    /// The name used in JSON output (`cpu`, `cuda:0`).
    pub fn name(self) -> String {
        match self {
            DeviceSpec::Cpu => "cpu".into(),
            DeviceSpec::Cuda(n) => format!("cuda:{n}"),
        }
    }
}

/// Parses and opens `train.device`.
pub fn open(spec: &str) -> Result<Device, TrainError> {
    DeviceSpec::parse(spec).map_err(TrainError::Config)?.open()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_device_names() {
        assert_eq!(DeviceSpec::parse("cpu"), Ok(DeviceSpec::Cpu));
        assert_eq!(DeviceSpec::parse("cuda"), Ok(DeviceSpec::Cuda(0)));
        assert_eq!(DeviceSpec::parse("cuda:3"), Ok(DeviceSpec::Cuda(3)));
        for bad in ["gpu", "cuda:", "cuda:x", "CPU", ""] {
            let err = DeviceSpec::parse(bad).unwrap_err();
            assert!(err.contains("train.device"), "{bad}: {err}");
        }
    }

    #[test]
    fn cuda_without_cuda_is_a_clear_error() {
        if candle_core::utils::cuda_is_available() {
            return; // a CUDA build: covered by scripts/gpu-check.sh on a GPU machine
        }
        let err = open("cuda:0").unwrap_err().to_string();
        assert!(
            err.contains("built without CUDA") && err.contains("train.device"),
            "{err}"
        );
        assert!(open("cpu").unwrap().is_cpu());
    }
}
