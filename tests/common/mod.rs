//! Shared helpers for the parity tests: golden files (the format of ../shared/goldens and of our
//! own tests/fixtures), cached runtimes per (checkpoint, backend), and diff helpers.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use qwen_vl::image::PixelValues;
use qwen_vl::{Backend, DeviceHandle, LoadOptions, Runtime};
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

/// tests/fixtures
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// ../shared/goldens, if this checkout has it.
pub fn shared_goldens() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/goldens");
    p.join("README.md").exists().then_some(p)
}

/// The checkpoint folder of a fixture name: `fixtures/NAME` or `shared:NAME` for ../shared/goldens.
pub fn checkpoint_dir(name: &str) -> Option<PathBuf> {
    match name.strip_prefix("shared:") {
        Some(fam) => {
            let Some(root) = shared_goldens() else {
                eprintln!("SKIP {name}: ../shared/goldens is not present in this checkout");
                return None;
            };
            Some(root.join(fam))
        }
        None => {
            let p = fixtures().join(name);
            assert!(
                p.join("config.json").exists(),
                "fixture {} is missing",
                p.display()
            );
            Some(p)
        }
    }
}

/// One golden: `golden_<tag>.json` + `golden_<tag>.safetensors`.
pub struct Golden {
    pub tag: String,
    pub json: serde_json::Value,
    bytes: Vec<u8>,
}

impl Golden {
    pub fn all(dir: &Path) -> Vec<Golden> {
        let mut tags: Vec<String> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.strip_prefix("golden_")
                    .and_then(|r| r.strip_suffix(".json"))
                    .map(str::to_string)
            })
            .collect();
        tags.sort();
        assert!(!tags.is_empty(), "no golden_*.json in {}", dir.display());
        tags.into_iter()
            .map(|tag| {
                let json = std::fs::read_to_string(dir.join(format!("golden_{tag}.json"))).unwrap();
                Golden {
                    json: serde_json::from_str(&json).unwrap(),
                    bytes: std::fs::read(dir.join(format!("golden_{tag}.safetensors"))).unwrap(),
                    tag,
                }
            })
            .collect()
    }

    fn tensor(&self, name: &str) -> Option<(Dtype, Vec<usize>, Vec<u8>)> {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st.tensor(name).ok()?;
        Some((t.dtype(), t.shape().to_vec(), t.data().to_vec()))
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensor(name).is_some()
    }

    pub fn f32(&self, name: &str) -> (Vec<f32>, Vec<usize>) {
        let (dt, shape, data) = self
            .tensor(name)
            .unwrap_or_else(|| panic!("golden {} lacks {name}", self.tag));
        assert_eq!(dt, Dtype::F32, "{name}");
        (
            data.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            shape,
        )
    }

    pub fn ints(&self, name: &str) -> (Vec<i64>, Vec<usize>) {
        let (dt, shape, data) = self
            .tensor(name)
            .unwrap_or_else(|| panic!("golden {} lacks {name}", self.tag));
        let v = match dt {
            Dtype::I64 => data
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            Dtype::I32 => data
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as i64)
                .collect(),
            Dtype::U8 => data.iter().map(|&b| b as i64).collect(),
            other => panic!("{name}: unexpected dtype {other:?}"),
        };
        (v, shape)
    }

    pub fn ids(&self, name: &str) -> Vec<u32> {
        self.ints(name).0.into_iter().map(|v| v as u32).collect()
    }

    pub fn grids(&self) -> Vec<[usize; 3]> {
        if !self.has("image_grid_thw") {
            return Vec::new();
        }
        let (v, _) = self.ints("image_grid_thw");
        v.chunks_exact(3)
            .map(|c| [c[0] as usize, c[1] as usize, c[2] as usize])
            .collect()
    }

    /// The golden pixel_values split per image.
    pub fn pixel_values(&self) -> Vec<PixelValues> {
        let grids = self.grids();
        if grids.is_empty() {
            return Vec::new();
        }
        let (data, shape) = self.f32("pixel_values");
        let cols = shape[1];
        let mut out = Vec::new();
        let mut row = 0;
        for g in grids {
            let rows = g[0] * g[1] * g[2];
            out.push(PixelValues {
                data: data[row * cols..(row + rows) * cols].to_vec(),
                rows,
                cols,
                grid_thw: g,
                resized_hw: (0, 0),
            });
            row += rows;
        }
        out
    }
}

/// Largest absolute difference (NaN counts as infinite); a length mismatch fails the test.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length differs");
    qwen_vl::selftest::max_abs_diff(a, b)
}

/// Whether the wgpu tests can run. Under CI=true a missing adapter fails the test.
pub fn wgpu_or_skip(test: &str) -> bool {
    match DeviceHandle::wgpu() {
        Ok(_) => true,
        Err(e) => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("{test}: CI=true but no wgpu adapter: {e}");
            }
            eprintln!("SKIP {test}: no wgpu adapter ({e})");
            false
        }
    }
}

type Key = (PathBuf, bool);

/// A runtime per (checkpoint, backend), loaded once per test binary.
pub fn runtime(dir: &Path, backend: Backend) -> Arc<Runtime> {
    static CACHE: OnceLock<Mutex<HashMap<Key, Arc<Runtime>>>> = OnceLock::new();
    let key = (dir.to_path_buf(), backend == Backend::Wgpu);
    let mut map = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    map.entry(key)
        .or_insert_with(|| {
            let options = LoadOptions {
                backend,
                ..Default::default()
            };
            Arc::new(
                Runtime::load(dir, &options, &mut |_| {})
                    .unwrap_or_else(|e| panic!("loading {}: {e}", dir.display())),
            )
        })
        .clone()
}
