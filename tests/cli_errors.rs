//! Bad input ends in one clear `error:` line on stderr and a non-zero exit code, never a panic.
//! Each case breaks one thing in a copy of the bundled checkpoint and runs the real binary.

use std::path::{Path, PathBuf};
use std::process::Command;

use safetensors::SafeTensors;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2_vl_hub")
}

/// A scratch copy of the bundled checkpoint.
fn copy_fixture() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for e in std::fs::read_dir(fixture()).expect("fixture") {
        let e = e.expect("entry");
        let name = e.file_name();
        if !name.to_string_lossy().starts_with("golden_") {
            std::fs::copy(e.path(), dir.path().join(name)).expect("copy");
        }
    }
    dir
}

/// Runs `qwen-vl generate` on the CPU backend; returns (exit code, stderr).
fn run(model: &Path, extra: &[&str]) -> (i32, String) {
    let image = fixture().join("image0.png");
    let mut args = vec![
        "generate".to_string(),
        "--device".into(),
        "cpu".into(),
        "--model".into(),
        model.display().to_string(),
        "--max-new-tokens".into(),
        "4".into(),
    ];
    if !extra.contains(&"--image") && !extra.contains(&"--no-image") {
        args.extend(["--image".into(), image.display().to_string()]);
    }
    args.extend(
        extra
            .iter()
            .filter(|a| **a != "--no-image")
            .map(|s| s.to_string()),
    );
    if !extra.contains(&"--prompt") {
        args.extend(["--prompt".into(), "Describe this image.".into()]);
    }
    let out = Command::new(env!("CARGO_BIN_EXE_qwen-vl"))
        .args(&args)
        .output()
        .expect("run qwen-vl");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code().unwrap_or(-1), stderr)
}

/// Asserts a failed run with exactly one `error:` line that mentions every `needle`.
fn assert_clear_error(case: &str, (code, stderr): (i32, String), needles: &[&str]) {
    assert_ne!(
        code, 0,
        "{case}: expected a failure exit code, stderr:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{case}: panicked:\n{stderr}");
    assert!(
        !stderr.contains("internal failure"),
        "{case}: hit a panic:\n{stderr}"
    );
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error:") && !l.contains("XDG_RUNTIME_DIR"))
        .collect();
    assert_eq!(
        errors.len(),
        1,
        "{case}: expected one error line, stderr:\n{stderr}"
    );
    for n in needles {
        assert!(
            errors[0].contains(n),
            "{case}: error line does not mention `{n}`: {}",
            errors[0]
        );
    }
    println!("{case}: {}", errors[0]);
}

fn shard(dir: &Path) -> PathBuf {
    dir.join("model-00001-of-00002.safetensors")
}

/// Rewrites the first shard with `edit` applied to its (name, shape, bytes) list.
fn rewrite_shard(dir: &Path, edit: impl Fn(&mut Vec<(String, Vec<usize>, Vec<u8>)>)) {
    let bytes = std::fs::read(shard(dir)).expect("read shard");
    let st = SafeTensors::deserialize(&bytes).expect("parse shard");
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.shape().to_vec(), v.data().to_vec()))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    edit(&mut tensors);
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, s.clone(), d)
                    .expect("view"),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &shard(dir)).expect("write shard");
}

#[test]
fn missing_shard_is_a_clear_error() {
    let dir = copy_fixture();
    std::fs::remove_file(shard(dir.path())).unwrap();
    assert_clear_error(
        "missing shard",
        run(dir.path(), &[]),
        &["model-00001-of-00002.safetensors"],
    );
}

#[test]
fn corrupt_safetensors_is_a_clear_error() {
    let dir = copy_fixture();
    std::fs::write(shard(dir.path()), b"this is not a safetensors file at all").unwrap();
    assert_clear_error(
        "corrupt shard",
        run(dir.path(), &[]),
        &[
            "model-00001-of-00002.safetensors",
            "not a valid safetensors",
        ],
    );
}

#[test]
fn truncated_safetensors_is_a_clear_error() {
    let dir = copy_fixture();
    let bytes = std::fs::read(shard(dir.path())).unwrap();
    std::fs::write(shard(dir.path()), &bytes[..bytes.len() / 2]).unwrap();
    assert_clear_error(
        "truncated shard",
        run(dir.path(), &[]),
        &["model-00001-of-00002.safetensors", "truncated"],
    );
}

#[test]
fn missing_tensor_is_a_clear_error() {
    let dir = copy_fixture();
    rewrite_shard(dir.path(), |t| {
        t.retain(|(n, _, _)| n != "model.layers.1.mlp.up_proj.weight")
    });
    assert_clear_error(
        "missing tensor",
        run(dir.path(), &[]),
        &["lm.layers.1.mlp.up_proj.weight", "missing"],
    );
}

#[test]
fn misshaped_tensor_is_a_clear_error() {
    let dir = copy_fixture();
    rewrite_shard(dir.path(), |t| {
        for (n, shape, _) in t.iter_mut() {
            if n == "model.layers.0.mlp.gate_proj.weight" {
                // Same bytes, other shape: [64, 32] -> [32, 64].
                shape.swap(0, 1);
            }
        }
    });
    assert_clear_error(
        "mis-shaped tensor",
        run(dir.path(), &[]),
        &[
            "model.layers.0.mlp.gate_proj.weight",
            "[32, 64]",
            "[64, 32]",
        ],
    );
}

#[test]
fn wrong_model_type_is_a_clear_error() {
    let dir = copy_fixture();
    let cfg = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    let cfg = cfg.replace("\"qwen2_vl\"", "\"llava\"").replace(
        "Qwen2VLForConditionalGeneration",
        "LlavaForConditionalGeneration",
    );
    std::fs::write(dir.path().join("config.json"), cfg).unwrap();
    assert_clear_error(
        "wrong model_type",
        run(dir.path(), &[]),
        &["config.json", "llava"],
    );
}

#[test]
fn non_image_file_is_a_clear_error() {
    let dir = copy_fixture();
    let path = dir.path().join("notes.png");
    std::fs::write(&path, b"just some text, not pixels").unwrap();
    assert_clear_error(
        "non-image",
        run(&fixture(), &["--image", path.to_str().unwrap()]),
        &["notes.png"],
    );
}

#[test]
fn unreadable_image_is_a_clear_error() {
    assert_clear_error(
        "missing image",
        run(&fixture(), &["--image", "/nonexistent/photo.jpg"]),
        &["/nonexistent/photo.jpg"],
    );
}

#[test]
fn zero_size_image_is_a_clear_error() {
    let dir = copy_fixture();
    let empty = dir.path().join("empty.png");
    std::fs::write(&empty, b"").unwrap();
    assert_clear_error(
        "empty image file",
        run(&fixture(), &["--image", empty.to_str().unwrap()]),
        &["empty.png"],
    );
    // A well-formed PNG header that says 0 x 0 pixels.
    let ihdr = b"IHDR\x00\x00\x00\x00\x00\x00\x00\x00\x08\x02\x00\x00\x00";
    let mut png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0d".to_vec();
    png.extend_from_slice(ihdr);
    png.extend_from_slice(&crc32(ihdr).to_be_bytes());
    let zero = dir.path().join("zero.png");
    std::fs::write(&zero, png).unwrap();
    assert_clear_error(
        "0x0 png",
        run(&fixture(), &["--image", zero.to_str().unwrap()]),
        &["zero.png"],
    );
}

#[test]
fn prompt_longer_than_context_is_a_clear_error() {
    assert_clear_error(
        "prompt > context",
        run(&fixture(), &["--max-context", "32"]),
        &["context"],
    );
}

#[test]
fn missing_model_folder_is_a_clear_error() {
    assert_clear_error(
        "no model",
        run(Path::new("/nonexistent/model"), &[]),
        &["/nonexistent/model"],
    );
}

/// CRC-32 (IEEE) as PNG chunks use it.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn video_input_is_refused_clearly() {
    let dir = copy_fixture();
    let clip = dir.path().join("clip.mp4");
    let mut bytes = vec![0, 0, 0, 0x18];
    bytes.extend_from_slice(b"ftypmp42\0\0\0\0mp42isom");
    std::fs::write(&clip, bytes).unwrap();
    assert_clear_error(
        "video",
        run(&fixture(), &["--image", clip.to_str().unwrap()]),
        &["clip.mp4", "video input is not supported"],
    );
}

#[test]
fn moe_checkpoint_is_refused_clearly() {
    let dir = copy_fixture();
    let cfg = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        cfg.replace("\"qwen2_vl\"", "\"qwen3_vl_moe\""),
    )
    .unwrap();
    assert_clear_error("moe", run(dir.path(), &[]), &["mixture-of-experts"]);
}

/// A q4 copy of the bundled checkpoint written by `qwen-vl quantize`.
fn quantized_fixture() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = Command::new(env!("CARGO_BIN_EXE_qwen-vl"))
        .args(["quantize", "--quant", "q4", "--model"])
        .arg(fixture())
        .arg("--out")
        .arg(dir.path())
        .output()
        .expect("run qwen-vl quantize");
    assert!(
        out.status.success(),
        "qwen-vl quantize failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

fn edit_quant_config(dir: &Path, edit: impl Fn(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("config")).expect("json");
    edit(&mut v["quantization_config"]);
    std::fs::write(&path, v.to_string()).expect("write config");
}

#[test]
fn unknown_quantization_scheme_is_a_clear_error() {
    let dir = quantized_fixture();
    edit_quant_config(dir.path(), |q| q["scheme"] = "q3".into());
    assert_clear_error(
        "scheme q3",
        run(dir.path(), &[]),
        &["config.json", "quantization_config.scheme", "q3"],
    );
}

#[test]
fn foreign_quantization_config_is_a_clear_error() {
    let dir = quantized_fixture();
    edit_quant_config(dir.path(), |q| {
        *q = serde_json::json!({"quant_method": "awq", "bits": 4, "group_size": 128})
    });
    assert_clear_error(
        "awq",
        run(dir.path(), &[]),
        &["quantization_config.quant_method", "awq", "--quant"],
    );
}

#[test]
fn corrupt_packed_tensor_is_a_clear_error() {
    let dir = quantized_fixture();
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).expect("read");
    let st = SafeTensors::deserialize(&bytes).expect("parse");
    // Drop the last word of every row of one packed matrix: a length that fits no [out, in].
    let victim = "model.layers.0.mlp.up_proj.qweight";
    let tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            let (mut shape, mut data) = (v.shape().to_vec(), v.data().to_vec());
            if n == victim {
                let w = shape[1];
                data = data
                    .chunks(4 * w)
                    .flat_map(|r| r[..4 * (w - 1)].to_vec())
                    .collect();
                shape[1] = w - 1;
            }
            (n, v.dtype(), shape, data)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, t, s, d)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*t, s.clone(), d).expect("view"),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).expect("write");
    assert_clear_error(
        "short qweight",
        run(dir.path(), &[]),
        &[victim, "model.safetensors", "q4", "qwen-vl quantize"],
    );
}

#[test]
fn quant_flag_that_disagrees_with_the_folder_is_a_clear_error() {
    let dir = quantized_fixture();
    assert_clear_error(
        "--quant q8 on q4",
        run(dir.path(), &["--quant", "q8"]),
        &["already quantized as q4", "--quant q4"],
    );
}
