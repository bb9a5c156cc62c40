//! Device selection and the adapter facts the model needs (binding limits, adapter identity).

use burn::tensor::Device;

/// Which backend runs the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// wgpu (Vulkan / Metal / DX12 / GL / browser WebGPU).
    Wgpu,
    /// Burn's pure-Rust CPU backend (`flex`).
    Cpu,
}

/// Device limits that shape how tensors are split and kernels are tiled, and which attention
/// path runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// The largest buffer one shader binding may see, in bytes.
    pub max_binding: usize,
    /// The most bytes of attention scores the plain path materialises at once.
    pub score_budget: usize,
    /// Max invocations per workgroup.
    pub max_invocations: u32,
    /// Max workgroup (shared) memory in bytes.
    pub max_shared: u32,
    /// Use the hand-written WGSL kernels where tensors live on wgpu.
    pub wgsl_kernels: bool,
}

/// "No limit" on a binding: 1 TiB, or all of a 32-bit address space (wasm32).
#[cfg(target_pointer_width = "64")]
const NO_BINDING_LIMIT: usize = 1 << 40;
#[cfg(not(target_pointer_width = "64"))]
const NO_BINDING_LIMIT: usize = usize::MAX;

impl Limits {
    /// Limits of a backend without binding restrictions (the CPU).
    pub fn unbounded() -> Self {
        Limits {
            max_binding: NO_BINDING_LIMIT,
            score_budget: 256 << 20,
            max_invocations: 256,
            max_shared: 16 << 10,
            wgsl_kernels: false,
        }
    }

    /// Limits of a wgpu device.
    pub fn from_wgpu(limits: &burn::backend::wgpu::wgpu::Limits) -> Self {
        let max_binding = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        let max_binding = usize::try_from(max_binding)
            .unwrap_or(usize::MAX)
            .min(NO_BINDING_LIMIT);
        Limits {
            max_binding,
            score_budget: (max_binding / 2).min(256 << 20),
            max_invocations: limits.max_compute_invocations_per_workgroup,
            max_shared: limits.max_compute_workgroup_storage_size,
            wgsl_kernels: true,
        }
    }
}

/// The adapter a runtime runs on, as reported by wgpu (or the CPU backend).
#[derive(Debug, Clone, serde::Serialize)]
pub struct AdapterInfo {
    /// Adapter name (e.g. "llvmpipe (LLVM 15.0.6, 256 bits)").
    pub name: String,
    /// Graphics API (vulkan, metal, dx12, gl, browser_webgpu) or "cpu".
    pub backend: String,
    /// Device type (discrete, integrated, cpu, virtual).
    pub device_type: String,
    /// Driver name and info.
    pub driver: String,
    /// Max storage buffer binding size in bytes.
    pub max_storage_binding: u64,
    /// Whether shader-f16 is available.
    pub shader_f16: bool,
}

/// A device plus what we know about it.
#[derive(Debug, Clone)]
pub struct DeviceHandle {
    /// The Burn device tensors are created on.
    pub device: Device,
    /// Backend kind.
    pub backend: Backend,
    /// Adapter facts.
    pub adapter: AdapterInfo,
    /// Limits for splitting tensors.
    pub limits: Limits,
}

/// Errors acquiring a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// wgpu found no usable adapter.
    #[error("no wgpu adapter could be initialised ({0}); install a Vulkan/Metal/DX12 driver (on Linux without a GPU: mesa-vulkan-drivers for lavapipe) or use --device cpu")]
    NoAdapter(String),
}

impl DeviceHandle {
    /// Burn's pure-Rust CPU backend.
    pub fn cpu() -> Self {
        DeviceHandle {
            device: Device::flex(),
            backend: Backend::Cpu,
            adapter: AdapterInfo {
                name: "burn-flex (CPU)".into(),
                backend: "cpu".into(),
                device_type: "cpu".into(),
                driver: String::new(),
                max_storage_binding: 1 << 40,
                shader_f16: false,
            },
            limits: Limits::unbounded(),
        }
    }

    /// The default wgpu adapter (native). The runtime is initialised once per process; later
    /// calls reuse it.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn wgpu() -> Result<Self, DeviceError> {
        use std::sync::OnceLock;
        static HANDLE: OnceLock<Result<DeviceHandle, String>> = OnceLock::new();
        HANDLE
            .get_or_init(|| {
                let (device, setup) = Device::wgpu_options()
                    .init_with_setup()
                    .map_err(|e| e.to_string())?;
                Ok(Self::from_setup(device, &setup))
            })
            .clone()
            .map_err(DeviceError::NoAdapter)
    }

    /// Describes an initialised wgpu device.
    pub fn from_setup(device: Device, setup: &burn::backend::wgpu::WgpuSetup) -> Self {
        let info = setup.adapter.get_info();
        let limits = setup.device.limits();
        let max_binding = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        DeviceHandle {
            device,
            backend: Backend::Wgpu,
            adapter: AdapterInfo {
                name: info.name.clone(),
                backend: format!("{:?}", info.backend).to_lowercase(),
                device_type: format!("{:?}", info.device_type).to_lowercase(),
                driver: format!("{} {}", info.driver, info.driver_info)
                    .trim()
                    .to_string(),
                max_storage_binding: max_binding,
                shader_f16: setup
                    .device
                    .features()
                    .contains(burn::backend::wgpu::wgpu::Features::SHADER_F16),
            },
            limits: Limits::from_wgpu(&limits),
        }
    }
}
