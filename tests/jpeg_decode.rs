//! JPEG decoding parity with Pillow 13 (libjpeg-turbo 3.2, the decoder transformers' image
//! pipeline reads files with): every fixture in tests/fixtures/jpeg decodes to exactly Pillow's
//! RGB, the model fixtures' image1.jpg reproduces the goldens' `image_rgb_u8_<i>` and then
//! `pixel_values` bit for bit, and broken files give an error that names them, never a panic.

use std::path::{Path, PathBuf};

use image::RgbImage;
use qwen_vl::image::{decode_image, load_image, preprocess, ImageError, PreprocessConfig};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Largest absolute difference between two byte slices of equal length, and how many differ.
fn u8_diff(a: &[u8], b: &[u8]) -> (u8, usize) {
    a.iter().zip(b).fold((0, 0), |(m, n), (&x, &y)| {
        (m.max(x.abs_diff(y)), n + usize::from(x != y))
    })
}

/// `what` if it matches `want` exactly, else a line saying how it differs.
fn compare_rgb(what: &str, got: &RgbImage, want: &RgbImage) -> Option<String> {
    if got.dimensions() != want.dimensions() {
        return Some(format!(
            "{what}: decoded {:?} (w, h), Pillow gives {:?}",
            got.dimensions(),
            want.dimensions()
        ));
    }
    let (max, n) = u8_diff(got.as_raw(), want.as_raw());
    (n > 0).then(|| {
        format!(
            "{what}: {n} of {} values differ from Pillow, by up to {max} levels",
            want.as_raw().len()
        )
    })
}

fn fixture_jpeg(name: &str) -> Vec<u8> {
    read(&fixtures().join("jpeg").join(format!("{name}.jpg")))
}

fn decode_ok(bytes: &[u8], what: &str) -> RgbImage {
    decode_image(bytes, what).unwrap_or_else(|e| panic!("{what}: {e}"))
}

#[test]
fn jpeg_fixtures_decode_bit_exact_with_pillow() {
    let dir = fixtures().join("jpeg");
    let manifest = String::from_utf8(read(&dir.join("manifest.txt"))).unwrap_or_default();
    let mut failures = Vec::new();
    let mut checked = 0;
    for line in manifest.lines().filter(|l| !l.trim().is_empty()) {
        let (name, what) = line.split_once(": ").unwrap_or((line, ""));
        let label = format!("{name}.jpg ({what})");
        let want = match image::open(dir.join(format!("{name}.png"))) {
            Ok(img) => img.to_rgb8(),
            Err(e) => panic!("{label}: reference {name}.png unreadable: {e}"),
        };
        match decode_image(&fixture_jpeg(name), &label) {
            Ok(got) => failures.extend(compare_rgb(&label, &got, &want)),
            Err(e) => failures.push(format!("{label}: Pillow decodes it, we fail: {e}")),
        }
        checked += 1;
    }
    assert!(
        checked >= 30,
        "manifest.txt lists only {checked} fixtures, expected at least 30"
    );
    assert!(
        failures.is_empty(),
        "{} of {checked} JPEGs differ from Pillow:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn jpeg_exif_orientation_is_applied() {
    // Stored 21x13 with orientation 6; Pillow's exif_transpose makes it 13x21 (the fixture test
    // checks the pixels).
    let img = decode_ok(
        &fixture_jpeg("exif_orientation_6"),
        "exif_orientation_6.jpg",
    );
    assert_eq!(
        img.dimensions(),
        (13, 21),
        "orientation 6 should swap width and height"
    );
}

/// Folder -> (file name of a golden image, its index in the golden, the golden's stem).
fn golden_jpegs(dir: &Path) -> Vec<(String, usize, String)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    let mut stems: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.strip_suffix(".json")
                .filter(|s| s.starts_with("golden_"))
                .map(str::to_string)
        })
        .collect();
    stems.sort();
    for stem in stems {
        let json: serde_json::Value =
            serde_json::from_slice(&read(&dir.join(format!("{stem}.json")))).unwrap_or_default();
        let images = json["images"].as_array().cloned().unwrap_or_default();
        for (i, name) in images.iter().enumerate() {
            if let Some(name) = name.as_str().filter(|n| n.ends_with(".jpg")) {
                out.push((name.to_string(), i, stem.clone()));
            }
        }
    }
    out
}

fn tensor(st: &safetensors::SafeTensors, name: &str, what: &str) -> (Vec<usize>, Vec<u8>) {
    match st.tensor(name) {
        Ok(t) => (t.shape().to_vec(), t.data().to_vec()),
        Err(e) => panic!("{what}: tensor {name} missing: {e}"),
    }
}

#[test]
fn fixture_jpegs_match_golden_rgb_and_pixel_values_bit_for_bit() {
    let mut checked = 0;
    for family in ["qwen2_vl_hub", "qwen2_vl_v5", "qwen2_5_vl", "qwen3_vl"] {
        let dir = fixtures().join(family);
        let cfg = PreprocessConfig::from_file(&dir.join("preprocessor_config.json"))
            .unwrap_or_else(|e| panic!("{e}"));
        for (name, i, stem) in golden_jpegs(&dir) {
            let what = format!("{family}/{stem} image {i} ({name})");
            let st_bytes = read(&dir.join(format!("{stem}.safetensors")));
            let st = safetensors::SafeTensors::deserialize(&st_bytes)
                .unwrap_or_else(|e| panic!("{what}: {e}"));

            let img = load_image(&dir.join(&name)).unwrap_or_else(|e| panic!("{what}: {e}"));
            let (shape, rgb) = tensor(&st, &format!("image_rgb_u8_{i}"), &what);
            let want = RgbImage::from_raw(shape[1] as u32, shape[0] as u32, rgb)
                .unwrap_or_else(|| panic!("{what}: image_rgb_u8_{i} has shape {shape:?}"));
            if let Some(diff) = compare_rgb(&what, &img, &want) {
                panic!("{diff}");
            }

            // This image's rows of pixel_values follow those of the images before it.
            let (_, grid) = tensor(&st, "image_grid_thw", &what);
            let grid: Vec<usize> = grid
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as usize)
                .collect();
            let rows_before: usize = grid
                .chunks_exact(3)
                .take(i)
                .map(|g| g[0] * g[1] * g[2])
                .sum();
            let (pv_shape, pv) = tensor(&st, "pixel_values", &what);
            let cols = pv_shape[1];
            let got = preprocess(&img, &cfg).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(
                got.grid_thw.to_vec(),
                grid[3 * i..3 * i + 3].to_vec(),
                "{what}: grid_thw"
            );
            let want: Vec<f32> = pv[rows_before * cols * 4..(rows_before + got.rows) * cols * 4]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let n_bits = got
                .data
                .iter()
                .zip(&want)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            let max = got
                .data
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert_eq!(
                (got.data.len(), n_bits),
                (want.len(), 0),
                "{what}: {n_bits} pixel_values differ from the golden, max abs diff {max:e}"
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 3,
        "expected image1.jpg in at least 3 goldens, checked {checked}"
    );
}

/// Offset of the SOF segment's precision byte (just after its length), walking the headers.
fn sof_precision_offset(bytes: &[u8]) -> usize {
    let mut pos = 2;
    while pos + 4 <= bytes.len() {
        let marker = bytes[pos + 1];
        if matches!(marker, 0xC0..=0xC3 | 0xC9..=0xCB) {
            return pos + 4;
        }
        pos += 2 + usize::from(u16::from_be_bytes([bytes[pos + 2], bytes[pos + 3]]));
    }
    panic!("test setup: no SOF marker found");
}

fn expect_error(bytes: &[u8], what: &str) -> ImageError {
    match decode_image(bytes, what) {
        Ok(img) => panic!(
            "{what}: decoded to {}x{} instead of failing",
            img.width(),
            img.height()
        ),
        Err(e) => {
            assert!(
                e.to_string().contains(what),
                "{what}: error should name the input: {e}"
            );
            e
        }
    }
}

#[test]
fn truncated_jpegs_are_errors_like_pillow() {
    // Pillow raises "image file is truncated" for all of these, the missing EOI included.
    for name in [
        "baseline_420_q95_odd",
        "progressive_420",
        "restart_blocks_420",
        "arithmetic",
    ] {
        let bytes = fixture_jpeg(name);
        let step = (bytes.len() / 97).max(1);
        let cuts = (0..bytes.len())
            .step_by(step)
            .chain([bytes.len() - 1, bytes.len() - 2]);
        for cut in cuts {
            expect_error(&bytes[..cut], &format!("{name}.jpg cut to {cut} bytes"));
        }
    }
}

#[test]
fn jpeg_header_problems_are_clear_errors() {
    let good = fixture_jpeg("baseline_420_q50");
    let p = sof_precision_offset(&good);

    let mut bytes = good.clone();
    bytes[p] = 12;
    let e = expect_error(&bytes, "twelve-bit.jpg");
    assert!(e.to_string().contains("12-bit"), "{e}");

    let mut bytes = good.clone();
    bytes[p + 1..p + 5].copy_from_slice(&[0x4e, 0x20, 0x4e, 0x20]); // 20000 x 20000
    match expect_error(&bytes, "bomb.jpg") {
        ImageError::TooLarge { .. } => {}
        e => panic!("a 20000x20000 header should be TooLarge, got {e:?}"),
    }

    let mut bytes = good.clone();
    bytes[p + 1..p + 3].copy_from_slice(&[0, 0]); // height 0 (DNL, which libjpeg rejects)
    expect_error(&bytes, "zero-height.jpg");

    expect_error(&good[..good.len() - 2], "no-eoi.jpg");
    expect_error(&good[..good.len() / 2], "half.jpg");
    expect_error(&[0xFF, 0xD8, 0xFF, 0xD9], "soi-eoi-only.jpg");

    // Bytes after EOI are ignored, as Pillow ignores them.
    let mut padded = good.clone();
    padded.extend_from_slice(b"trailing bytes without a marker");
    let (a, b) = (
        decode_ok(&good, "good.jpg"),
        decode_ok(&padded, "padded.jpg"),
    );
    assert_eq!(
        a.as_raw(),
        b.as_raw(),
        "trailing bytes after EOI changed the pixels"
    );
}

/// xorshift64: deterministic corruption without a rand dependency.
struct Corrupter(u64);

impl Corrupter {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n.max(1) as u64) as usize
    }
}

#[test]
fn corrupt_jpegs_never_panic() {
    let mut rng = Corrupter(0x9e37_79b9_7f4a_7c15);
    let mut decoded = 0;
    let mut failed = 0;
    for name in [
        "baseline_420_q95_odd",
        "progressive_420",
        "progressive_dc_only",
        "sample_mixed",
        "arithmetic_progressive",
        "cmyk_adobe_progressive",
        "restart_rows_progressive",
        "sequential_multiscan_restart",
    ] {
        let good = fixture_jpeg(name);
        for case in 0..150 {
            let mut bytes = good.clone();
            for _ in 0..1 + rng.below(6) {
                let len = bytes.len();
                if len < 4 {
                    break;
                }
                // Half the edits land in the first 600 bytes, where the tables and headers are.
                let span = if case % 2 == 0 { len.min(600) } else { len };
                let pos = 2 + rng.below(span - 2);
                match rng.below(4) {
                    0 => bytes[pos] = rng.below(256) as u8,
                    1 => bytes[pos] ^= 1 << rng.below(8),
                    2 => {
                        let code = [0xC4, 0xD0, 0xD9, 0xDA, 0xDB, 0xDD, 0xC0, 0xC2, 0x00];
                        bytes.splice(pos..pos, [0xFF, code[rng.below(code.len())]]);
                    }
                    _ => {
                        let end = (pos + rng.below(40)).min(len);
                        bytes.drain(pos..end);
                    }
                }
            }
            let what = format!("{name}.jpg corruption #{case}");
            match decode_image(&bytes, &what) {
                Ok(_) => decoded += 1,
                Err(e) => {
                    failed += 1;
                    assert!(
                        e.to_string().contains(&what),
                        "{what}: error should name the input: {e}"
                    );
                }
            }
        }
    }
    println!("corrupted JPEGs: {decoded} still decode, {failed} are errors, none panicked");
}
