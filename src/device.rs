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
    /// Workgroup size of the decode matvec kernel: the subgroup size on GPUs, 8 on CPU adapters
    /// (lavapipe, SwiftShader), where a workgroup of one SIMD width avoids reduction overhead
    /// (measured on lavapipe: 8 lanes x 8 rows beat 64 x 4 by 3-4x).
    pub matvec_wg: u32,
    /// Rows per workgroup of the quantized matvec: 64 on CPU adapters, where the group's inputs
    /// and the reduction are then shared by more rows (measured on lavapipe, Qwen2-VL-2B shapes,
    /// 4 layers, q4: 158 ms/token at 8 rows, 142 at 16, 116 at 64, 115 at 128), 8 on GPUs.
    pub qmatvec_rows: u32,
}

/// "No limit" on a binding: 1 TiB (capped to the address space on 32-bit targets, i.e. wasm32).
const NO_BINDING_LIMIT: u64 = 1 << 40;

impl Limits {
    /// Limits of a backend without binding restrictions (the CPU).
    pub fn unbounded() -> Self {
        Limits {
            max_binding: usize::try_from(NO_BINDING_LIMIT).unwrap_or(usize::MAX),
            score_budget: 256 << 20,
            max_invocations: 256,
            max_shared: 16 << 10,
            wgsl_kernels: false,
            matvec_wg: 8,
            qmatvec_rows: 64,
        }
    }

    /// Limits of a wgpu device.
    pub fn from_wgpu(
        limits: &burn::backend::wgpu::wgpu::Limits,
        info: &burn::backend::wgpu::wgpu::AdapterInfo,
    ) -> Self {
        let cpu = info.device_type == burn::backend::wgpu::wgpu::DeviceType::Cpu;
        let subgroup = if info.subgroup_min_size > 0 {
            info.subgroup_min_size
        } else {
            32
        };
        let max_binding = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        let max_binding = usize::try_from(max_binding.min(NO_BINDING_LIMIT)).unwrap_or(usize::MAX);
        Limits {
            max_binding,
            score_budget: (max_binding / 2).min(256 << 20),
            // The kernels use 1-D workgroups, so x bounds them as well as the invocation count.
            max_invocations: limits
                .max_compute_invocations_per_workgroup
                .min(limits.max_compute_workgroup_size_x),
            max_shared: limits.max_compute_workgroup_storage_size,
            wgsl_kernels: true,
            matvec_wg: if cpu { 8 } else { subgroup.clamp(8, 64) },
            qmatvec_rows: if cpu { 64 } else { 8 },
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
    /// One chosen adapter could not be opened.
    #[error("the wgpu adapter could not be opened: {0}")]
    Adapter(String),
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
            limits: Limits::from_wgpu(&limits, &info),
        }
    }
}

/// The limits of an adapter that shape how this crate splits tensors and tiles kernels.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AdapterLimits {
    /// Largest buffer, in bytes.
    pub max_buffer_size: u64,
    /// Largest storage-buffer binding, in bytes.
    pub max_storage_buffer_binding_size: u64,
    /// Workgroup (shared) memory, in bytes.
    pub max_compute_workgroup_storage_size: u32,
    /// Invocations per workgroup.
    pub max_compute_invocations_per_workgroup: u32,
    /// Workgroup size per dimension `[x, y, z]`.
    pub max_compute_workgroup_size: [u32; 3],
    /// Workgroups per dispatch dimension.
    pub max_compute_workgroups_per_dimension: u32,
    /// Storage buffers one shader stage may bind.
    pub max_storage_buffers_per_shader_stage: u32,
}

impl AdapterLimits {
    #[cfg(not(target_arch = "wasm32"))]
    fn from_wgpu(l: &burn::backend::wgpu::wgpu::Limits) -> Self {
        AdapterLimits {
            max_buffer_size: l.max_buffer_size,
            max_storage_buffer_binding_size: l.max_storage_buffer_binding_size,
            max_compute_workgroup_storage_size: l.max_compute_workgroup_storage_size,
            max_compute_invocations_per_workgroup: l.max_compute_invocations_per_workgroup,
            max_compute_workgroup_size: [
                l.max_compute_workgroup_size_x,
                l.max_compute_workgroup_size_y,
                l.max_compute_workgroup_size_z,
            ],
            max_compute_workgroups_per_dimension: l.max_compute_workgroups_per_dimension,
            max_storage_buffers_per_shader_stage: l.max_storage_buffers_per_shader_stage,
        }
    }
}

/// The optional features of an adapter this crate cares about.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AdapterFeatures {
    /// `shader-f16`: f16 arithmetic in shaders (needed for `--dtype f16`).
    pub shader_f16: bool,
    /// Subgroup operations in compute shaders.
    pub subgroups: bool,
    /// Subgroup size range `[min, max]` as reported (0 when unknown).
    pub subgroup_size: [u32; 2],
    /// Timestamp queries (device-side timing).
    pub timestamp_query: bool,
    /// 64-bit integers in shaders.
    pub shader_int64: bool,
}

/// One adapter as wgpu enumerates it on one graphics API: what `qwen-vl devices` prints and
/// what [`DeviceHandle::wgpu_adapter`] opens.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AdapterEntry {
    /// Position in [`enumerate_adapters`]'s list (stable for one machine and driver set).
    pub index: usize,
    /// Adapter name.
    pub name: String,
    /// Vendor id (PCI vendor id on most backends).
    pub vendor_id: u32,
    /// Device id (PCI device id on most backends).
    pub device_id: u32,
    /// Driver name.
    pub driver: String,
    /// Driver version / details.
    pub driver_info: String,
    /// Graphics API: vulkan, metal, dx12, gl.
    pub backend: String,
    /// discrete, integrated, virtual, cpu or other.
    pub device_type: String,
    /// How the runtime addresses it (`Cpu`, `DiscreteGpu(0)`, ...) on its graphics API; `None`
    /// when the runtime cannot address it (a second CPU adapter on the same API).
    pub selector: Option<String>,
    /// Limits.
    pub limits: AdapterLimits,
    /// Features.
    pub features: AdapterFeatures,
    #[serde(skip)]
    #[cfg_attr(target_arch = "wasm32", allow(dead_code))]
    target: Option<burn::backend::wgpu::WgpuDevice>,
}

#[cfg(not(target_arch = "wasm32"))]
fn type_name(t: burn::backend::wgpu::wgpu::DeviceType) -> &'static str {
    use burn::backend::wgpu::wgpu::DeviceType;
    match t {
        DeviceType::DiscreteGpu => "discrete",
        DeviceType::IntegratedGpu => "integrated",
        DeviceType::VirtualGpu => "virtual",
        DeviceType::Cpu => "cpu",
        DeviceType::Other => "other",
    }
}

/// Every adapter wgpu can enumerate, on every graphics API compiled into this build (Vulkan,
/// Metal, DX12, GL; each API through its own instance, as the runtime selects them), in that
/// API order and wgpu's order within an API.
#[cfg(not(target_arch = "wasm32"))]
pub fn enumerate_adapters() -> Vec<AdapterEntry> {
    use burn::backend::wgpu::wgpu::{self, Backend as Api, DeviceType, Features};
    use burn::backend::wgpu::{WgpuBackend, WgpuDevice};
    use burn::cubecl::wgpu::WgpuDeviceKind;
    // The Vulkan loader misbehaves when instances are created on several threads at once.
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut out = Vec::new();
    for (api, pinned) in [
        (Api::Vulkan, WgpuBackend::Vulkan),
        (Api::Metal, WgpuBackend::Metal),
        (Api::Dx12, WgpuBackend::Dx12),
        (Api::Gl, WgpuBackend::Gl),
    ] {
        if !wgpu::Instance::enabled_backend_features().contains(api.into()) {
            continue;
        }
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
            backends: api.into(),
            ..wgpu::InstanceDescriptor::new_without_display_handle()
        });
        // The runtime picks "the n-th adapter of this type on this API" (the CPU kind: always
        // the first), so count per type in the same enumeration order.
        let mut seen = [0usize; 5];
        for adapter in pollster::block_on(instance.enumerate_adapters(api.into())) {
            let info = adapter.get_info();
            let features = adapter.features();
            let slot = match info.device_type {
                DeviceType::DiscreteGpu => 0,
                DeviceType::IntegratedGpu => 1,
                DeviceType::VirtualGpu => 2,
                DeviceType::Cpu => 3,
                DeviceType::Other => 4,
            };
            let n = seen[slot];
            seen[slot] += 1;
            let kind = match info.device_type {
                DeviceType::DiscreteGpu => Some(WgpuDeviceKind::DiscreteGpu(n)),
                DeviceType::IntegratedGpu => Some(WgpuDeviceKind::IntegratedGpu(n)),
                DeviceType::VirtualGpu => Some(WgpuDeviceKind::VirtualGpu(n)),
                DeviceType::Cpu => (n == 0).then_some(WgpuDeviceKind::Cpu),
                DeviceType::Other => Some(WgpuDeviceKind::Other(n)),
            };
            out.push(AdapterEntry {
                index: out.len(),
                name: info.name.clone(),
                vendor_id: info.vendor,
                device_id: info.device,
                driver: info.driver.clone(),
                driver_info: info.driver_info.clone(),
                backend: format!("{:?}", info.backend).to_lowercase(),
                device_type: type_name(info.device_type).into(),
                selector: kind.as_ref().map(|k| format!("{k:?}")),
                limits: AdapterLimits::from_wgpu(&adapter.limits()),
                features: AdapterFeatures {
                    shader_f16: features.contains(Features::SHADER_F16),
                    subgroups: features.contains(Features::SUBGROUP),
                    subgroup_size: [info.subgroup_min_size, info.subgroup_max_size],
                    timestamp_query: features.contains(Features::TIMESTAMP_QUERY),
                    shader_int64: features.contains(Features::SHADER_INT64),
                },
                target: kind.map(|kind| WgpuDevice {
                    kind,
                    backend: pinned,
                }),
            });
        }
    }
    out
}

impl DeviceHandle {
    /// One enumerated adapter, on the graphics API it was listed on. Each adapter's runtime is
    /// initialised once per process; later calls return the same handle (or the same error).
    /// Independent of [`DeviceHandle::wgpu`]: the default adapter opened both ways is two
    /// devices on one adapter.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn wgpu_adapter(adapter: &AdapterEntry) -> Result<Self, DeviceError> {
        use std::collections::HashMap;
        use std::sync::{Mutex, OnceLock};
        type Opened = HashMap<String, Result<DeviceHandle, String>>;
        static OPENED: OnceLock<Mutex<Opened>> = OnceLock::new();
        let Some(target) = &adapter.target else {
            return Err(DeviceError::Adapter(format!(
                "adapter {} ({} on {}) cannot be addressed by the runtime: only the first CPU adapter of a graphics API can",
                adapter.index, adapter.name, adapter.backend
            )));
        };
        let key = format!("{target:?}");
        let mut opened = OPENED
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        opened
            .entry(key)
            .or_insert_with(|| {
                // Burn's `DeviceKind` has no `Other` (what GL calls most GPUs), so go one level
                // down: this is what `Device::wgpu_options().init_with_setup()` does.
                let setup = burn::backend::wgpu::try_init_setup::<
                    burn::backend::wgpu::graphics::AutoGraphicsApi,
                >(
                    target,
                    burn::backend::wgpu::RuntimeOptions::try_default()
                        .map_err(|e| e.to_string())?,
                )
                .map_err(|e| format!("adapter {} ({}): {e}", adapter.index, adapter.name))?;
                Ok(Self::from_setup(Device::from(target.clone()), &setup))
            })
            .clone()
            .map_err(DeviceError::Adapter)
    }
}
