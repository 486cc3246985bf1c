//! What a GPU's driver says of its memory and load, from NVIDIA's management library (NVML).
//! The library is loaded at run time, once, on an NVIDIA adapter only: on a box without the
//! NVIDIA driver (lavapipe, another vendor's GPU, the CPU path) there is nothing to load, and the
//! worker reports its adapter's name alone.

/// The GPU's memory and load as its driver reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuUsage {
    /// Its memory, bytes.
    pub memory_total_bytes: u64,
    /// Its memory in use by every process on it, bytes.
    pub memory_used_bytes: u64,
    /// The share of the driver's last sample period in which a kernel ran, percent.
    pub utilization_percent: u32,
}

/// NVIDIA's PCI vendor id.
pub const NVIDIA: u32 = 0x10de;

/// NVML, opened for one GPU.
#[derive(Debug)]
pub struct Nvml {
    lib: nvml_wrapper::Nvml,
    bus_id: String,
}

impl Nvml {
    /// NVML for the adapter `name` at PCI bus `bus_id` (wgpu's, empty where the platform gives
    /// none; then the GPU of that name); an error saying why not.
    pub fn open(name: &str, bus_id: &str) -> Result<Nvml, String> {
        let lib = nvml_wrapper::Nvml::init().map_err(|e| format!("NVML: {e}"))?;
        if !bus_id.is_empty() && lib.device_by_pci_bus_id(bus_id).is_ok() {
            return Ok(Nvml { lib, bus_id: bus_id.to_owned() });
        }
        let count = lib.device_count().map_err(|e| format!("NVML: {e}"))?;
        let mut found = None;
        for i in 0..count {
            let Ok(d) = lib.device_by_index(i) else { continue };
            if d.name().is_ok_and(|n| !n.is_empty() && name.contains(&n)) {
                found = d.pci_info().ok().map(|p| p.bus_id);
                break;
            }
        }
        match found {
            Some(bus_id) => Ok(Nvml { lib, bus_id }),
            None => Err(format!("NVML has no GPU at {bus_id:?} or named {name:?}")),
        }
    }

    /// The GPU's memory and load now.
    pub fn usage(&self) -> Result<GpuUsage, String> {
        let d = self.lib.device_by_pci_bus_id(self.bus_id.as_str()).map_err(|e| format!("NVML: {e}"))?;
        let memory = d.memory_info().map_err(|e| format!("NVML memory: {e}"))?;
        let load = d.utilization_rates().map_err(|e| format!("NVML utilisation: {e}"))?;
        Ok(GpuUsage {
            memory_total_bytes: memory.total,
            memory_used_bytes: memory.used,
            utilization_percent: load.gpu.min(100),
        })
    }
}
