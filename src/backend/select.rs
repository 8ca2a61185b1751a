//! `--device auto|cpu|cuda|sim:<capacity>`: which device runs the resident weights. Any
//! failure to get the GPU ends in a one-line notice and the CPU, never an error.

use super::cuda::{self, CudaDevice};
use super::device::Device;
use super::sim::{SimCost, SimDevice, parse_size};
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq)]
pub enum DeviceChoice {
    /// A CUDA GPU when one is usable, else the CPU (quietly when there is no NVIDIA driver).
    Auto,
    Cpu,
    Cuda,
    /// The simulated device with this many bytes.
    Sim(u64),
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda),
            _ => match s.strip_prefix("sim:") {
                Some(c) => parse_size(c).map(DeviceChoice::Sim),
                None => Err(format!(
                    "expected auto, cpu, cuda or sim:<capacity> (e.g. sim:24G), got '{s}'"
                )),
            },
        }
    }
}

/// The device to use (None: the CPU alone) and the notice to print, if any.
pub struct Opened {
    pub device: Option<Arc<dyn Device>>,
    pub notice: Option<String>,
}

pub fn open(choice: &DeviceChoice) -> Opened {
    let cpu = |notice: Option<String>| Opened {
        device: None,
        notice,
    };
    match choice {
        DeviceChoice::Cpu => cpu(None),
        DeviceChoice::Sim(cap) => Opened {
            device: Some(Arc::new(SimDevice::new(*cap, SimCost::default()))),
            notice: None,
        },
        DeviceChoice::Auto if !cuda::driver_present() => cpu(None),
        DeviceChoice::Auto | DeviceChoice::Cuda => match CudaDevice::open(0) {
            Ok(d) => Opened {
                device: Some(Arc::new(d)),
                notice: None,
            },
            Err(e) => cpu(Some(format!(
                "dsflash: CUDA unavailable ({e}); running on the CPU"
            ))),
        },
    }
}
