//! Image preprocessing parity with transformers 5.23's `Qwen2VLImageProcessor` (torchvision
//! backend): smart_resize, config parsing, decoding, the uint8 bicubic resize, normalisation and
//! patch order. The golden check at the end runs only where `../shared/goldens` exists.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageBuffer, ImageFormat, Luma, Rgb, RgbImage, Rgba};
use qwen_vl::image::*;

const QWEN2_CONFIG: &str = r#"{
  "do_convert_rgb": true, "do_normalize": true, "do_rescale": true, "do_resize": true,
  "image_mean": [0.48145466, 0.4578275, 0.40821073],
  "image_std": [0.26862954, 0.26130258, 0.27577711],
  "rescale_factor": 0.00392156862745098, "resample": 3,
  "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
  "min_pixels": 3136, "max_pixels": 50176,
  "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor"
}"#;

const QWEN3_CONFIG: &str = r#"{
  "do_convert_rgb": true, "do_normalize": true, "do_rescale": true, "do_resize": true,
  "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
  "rescale_factor": 0.00392156862745098, "resample": 3,
  "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
  "size": {"shortest_edge": 4096, "longest_edge": 49152},
  "image_processor_type": "Qwen2VLImageProcessorFast", "processor_class": "Qwen3VLProcessor"
}"#;

fn sr(h: usize, w: usize, f: usize, min: usize, max: usize) -> (usize, usize) {
    match smart_resize(h, w, f, min, max) {
        Ok(hw) => hw,
        Err(e) => panic!("smart_resize({h}, {w}, {f}, {min}, {max}) failed: {e}"),
    }
}

fn encode(img: DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut buf = Cursor::new(Vec::new());
    if let Err(e) = img.write_to(&mut buf, format) {
        panic!("test setup: encoding a {format:?} failed: {e}");
    }
    buf.into_inner()
}

fn decode(bytes: &[u8], what: &str) -> RgbImage {
    match decode_image(bytes, what) {
        Ok(img) => img,
        Err(e) => panic!("decoding {what} failed: {e}"),
    }
}

/// Largest absolute difference between two byte slices of equal length, and how many differ.
fn u8_diff(a: &[u8], b: &[u8]) -> (u8, usize) {
    assert_eq!(
        a.len(),
        b.len(),
        "length differs: {} vs {}",
        a.len(),
        b.len()
    );
    a.iter().zip(b).fold((0, 0), |(m, n), (&x, &y)| {
        (m.max(x.abs_diff(y)), n + usize::from(x != y))
    })
}

// ---------------------------------------------------------------- smart_resize

#[test]
fn smart_resize_matches_transformers_on_known_sizes() {
    // (h, w, factor, min, max) -> expected, from transformers 5.23's smart_resize.
    let cases = [
        ((212, 300, 28, 3136, 50176), (168, 252)),
        ((96, 128, 28, 3136, 50176), (84, 140)),
        ((212, 300, 32, 4096, 49152), (160, 256)),
        ((1080, 1920, 28, 3136, 1003520), (728, 1316)),
        ((1080, 1920, 32, 4096, 49152), (160, 288)),
        ((4000, 3000, 28, 3136, 1003520), (1148, 840)),
        ((5000, 25, 32, 4096, 16384 * 32 * 32), (4992, 32)),
    ];
    for ((h, w, f, min, max), want) in cases {
        assert_eq!(
            sr(h, w, f, min, max),
            want,
            "smart_resize({h}, {w}, {f}, {min}, {max})"
        );
    }
}

#[test]
fn smart_resize_rounds_half_to_even_like_python() {
    // 70/28 = 2.5 -> 2 (half-up would give 3 -> 84); 98/28 = 3.5 -> 4.
    assert_eq!(sr(70, 98, 28, 3136, 1003520), (56, 112));
    // 42/28 = 1.5 -> 2 and 70/28 = 2.5 -> 2: both land on 56.
    assert_eq!(sr(70, 42, 28, 784, 1_000_000_000), (56, 56));
    // 14/28 = 0.5 -> 0, then the min_pixels branch lifts it to one factor.
    assert_eq!(sr(14, 14, 28, 784, 1_000_000_000), (28, 28));
}

#[test]
fn smart_resize_clamps_to_min_and_max_pixels() {
    // Below min_pixels: scaled up by ceil.
    assert_eq!(sr(10, 10, 28, 3136, 1003520), (56, 56));
    assert_eq!(sr(1, 1, 28, 3136, 1003520), (56, 56));
    assert_eq!(sr(1, 200, 28, 3136, 1003520), (28, 812));
    assert_eq!(sr(3, 600, 28, 3136, 1003520), (28, 812));
    // Above max_pixels: floor, but never below one factor per side.
    assert_eq!(sr(99, 47, 28, 100, 200), (28, 28));
    let (h, w) = sr(4000, 3000, 28, 3136, 1003520);
    assert!(
        h * w <= 1003520,
        "max clamp left {h}x{w} = {} pixels",
        h * w
    );
}

#[test]
fn smart_resize_rejects_extreme_aspect_ratio_and_empty_sides() {
    // Exactly 200 is allowed, 201 is not (transformers raises ValueError).
    assert!(smart_resize(1, 200, 28, 3136, 1003520).is_ok());
    match smart_resize(1, 201, 28, 3136, 1003520) {
        Err(ImageError::AspectRatio { ratio, .. }) => {
            assert!((ratio - 201.0).abs() < 1e-9, "ratio {ratio}")
        }
        other => panic!("aspect ratio 201 should be rejected, got {other:?}"),
    }
    assert!(
        smart_resize(0, 10, 28, 3136, 1003520).is_err(),
        "zero height must be an error"
    );
    assert!(
        smart_resize(10, 0, 28, 3136, 1003520).is_err(),
        "zero width must be an error"
    );
    assert!(
        smart_resize(10, 10, 0, 3136, 1003520).is_err(),
        "factor 0 must be an error"
    );
    // min_pixels 0 lets a tiny image round to an empty size, which transformers cannot resize to.
    let err = smart_resize(5, 5, 28, 0, 1003520);
    assert!(
        err.is_err(),
        "an empty target must be an error, got {err:?}"
    );
}

// ---------------------------------------------------------------- config

fn parse(text: &str) -> PreprocessConfig {
    match PreprocessConfig::from_json_str(text, "test.json") {
        Ok(c) => c,
        Err(e) => panic!("config should parse: {e}"),
    }
}

#[test]
fn config_min_max_pixels_form_parses() {
    let c = parse(QWEN2_CONFIG);
    assert_eq!(
        (c.patch_size, c.temporal_patch_size, c.merge_size),
        (14, 2, 2)
    );
    assert_eq!((c.min_pixels, c.max_pixels), (3136, 50176));
    assert_eq!(
        c.image_mean,
        [
            0.48145466f64 as f32,
            0.4578275f64 as f32,
            0.40821073f64 as f32
        ]
    );
    assert_eq!(c.factor(), 28);
    assert!(c.do_resize && c.do_rescale && c.do_normalize);
}

#[test]
fn config_size_form_holds_pixel_counts() {
    let c = parse(QWEN3_CONFIG);
    assert_eq!((c.patch_size, c.factor()), (16, 32));
    assert_eq!((c.min_pixels, c.max_pixels), (4096, 49152));
    assert_eq!(c.image_std, [0.5; 3]);
}

#[test]
fn config_min_max_pixels_override_size_like_transformers() {
    let c = parse(
        r#"{"size": {"shortest_edge": 1, "longest_edge": 2}, "min_pixels": 100, "max_pixels": null}"#,
    );
    assert_eq!(
        (c.min_pixels, c.max_pixels),
        (100, 2),
        "min_pixels overrides, null is ignored"
    );
    let c = parse(r#"{"max_pixels": 999}"#);
    assert_eq!(
        (c.min_pixels, c.max_pixels),
        (3136, 999),
        "missing min falls back to the class default"
    );
}

#[test]
fn config_defaults_follow_transformers_class_defaults() {
    let c = parse("{}");
    assert_eq!(c, PreprocessConfig::default());
    assert_eq!(
        (c.patch_size, c.temporal_patch_size, c.merge_size),
        (14, 2, 2)
    );
    assert_eq!((c.min_pixels, c.max_pixels), (56 * 56, 28 * 28 * 1280));
    assert_eq!(
        c.image_mean,
        [
            0.48145466f64 as f32,
            0.4578275f64 as f32,
            0.40821073f64 as f32
        ]
    );
    assert_eq!(
        c.image_std,
        [
            0.26862954f64 as f32,
            0.26130258f64 as f32,
            0.27577711f64 as f32
        ]
    );
    assert_eq!(c.rescale_factor, 1.0 / 255.0);
}

#[test]
fn config_errors_name_the_file_and_field() {
    let cases = [
        ("{not json", "test.json"),
        (r#"{"patch_size": "14"}"#, "patch_size"),
        (r#"{"patch_size": 0}"#, "patch_size"),
        (r#"{"image_mean": [0.5, 0.5]}"#, "image_mean"),
        (r#"{"image_std": [0.5, 0.0, 0.5]}"#, "image_std"),
        (r#"{"size": {"shortest_edge": 3136}}"#, "size"),
        (r#"{"min_pixels": -5}"#, "min_pixels"),
        (r#"{"resample": 2}"#, "resample"),
        (r#"{"do_resize": "yes"}"#, "do_resize"),
    ];
    for (text, field) in cases {
        match PreprocessConfig::from_json_str(text, "test.json") {
            Ok(c) => panic!("{text} should be rejected, parsed as {c:?}"),
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("test.json") && msg.contains(field),
                    "error for {text} should name test.json and {field}: {msg}"
                );
            }
        }
    }
    match PreprocessConfig::from_file(Path::new("/nonexistent/preprocessor_config.json")) {
        Err(e) => assert!(
            e.to_string()
                .contains("/nonexistent/preprocessor_config.json"),
            "{e}"
        ),
        Ok(_) => panic!("a missing file must be an error"),
    }
}

// ---------------------------------------------------------------- decoding

fn sample_rgb(w: u32, h: u32) -> RgbImage {
    ImageBuffer::from_fn(w, h, |x, y| {
        Rgb([(x * 40) as u8, (y * 60) as u8, ((x + y) * 25) as u8])
    })
}

#[test]
fn decode_png_webp_gif_round_trip_exactly() {
    let img = sample_rgb(5, 4);
    for format in [ImageFormat::Png, ImageFormat::WebP, ImageFormat::Gif] {
        let bytes = encode(DynamicImage::ImageRgb8(img.clone()), format);
        let got = decode(&bytes, &format!("{format:?}"));
        assert_eq!(got.dimensions(), (5, 4), "{format:?} dimensions");
        let (max, n) = u8_diff(got.as_raw(), img.as_raw());
        assert_eq!(
            max, 0,
            "{format:?} (lossless) changed {n} values by up to {max}"
        );
    }
}

#[test]
fn decode_jpeg_gives_rgb_close_to_source() {
    let img: RgbImage =
        ImageBuffer::from_fn(16, 16, |x, y| Rgb([(x * 8) as u8, (y * 8) as u8, 128]));
    let bytes = encode(DynamicImage::ImageRgb8(img.clone()), ImageFormat::Jpeg);
    let got = decode(&bytes, "jpeg");
    assert_eq!(got.dimensions(), (16, 16));
    let (max, _) = u8_diff(got.as_raw(), img.as_raw());
    assert!(
        max <= 12,
        "JPEG round trip differs by {max} levels (lossy, but not that much)"
    );
}

#[test]
fn decode_composites_alpha_onto_white_like_pil() {
    // Expected values from PIL.Image.alpha_composite(white, rgba) (transformers' convert_to_rgb).
    let px = [
        ([200, 100, 37, 128], 227),
        ([0, 0, 0, 1], 254),
        ([255, 0, 0, 254], 255),
        ([100, 9, 9, 77], 208),
        ([37, 0, 0, 200], 84),
    ];
    let img = ImageBuffer::from_fn(px.len() as u32, 1, |x, _| Rgba(px[x as usize].0));
    let got = decode(
        &encode(DynamicImage::ImageRgba8(img), ImageFormat::Png),
        "rgba png",
    );
    for (i, (rgba, want_r)) in px.iter().enumerate() {
        let r = got.get_pixel(i as u32, 0).0[0];
        assert_eq!(
            r, *want_r,
            "pixel {rgba:?} over white: red {r}, PIL gives {want_r}"
        );
    }
    // Fully transparent -> white whatever the colour; opaque -> unchanged.
    let img = ImageBuffer::from_fn(2, 1, |x, _| {
        if x == 0 {
            Rgba([10, 20, 30, 0])
        } else {
            Rgba([10, 20, 30, 255])
        }
    });
    let got = decode(
        &encode(DynamicImage::ImageRgba8(img), ImageFormat::Png),
        "rgba png",
    );
    assert_eq!(got.get_pixel(0, 0).0, [255, 255, 255]);
    assert_eq!(got.get_pixel(1, 0).0, [10, 20, 30]);
}

#[test]
fn decode_gif_transparency_becomes_white() {
    let img = ImageBuffer::from_fn(3, 2, |x, _| {
        if x == 1 {
            Rgba([0, 0, 0, 0])
        } else {
            Rgba([200, 10, 10, 255])
        }
    });
    let got = decode(
        &encode(DynamicImage::ImageRgba8(img), ImageFormat::Gif),
        "gif",
    );
    assert_eq!(
        got.get_pixel(1, 1).0,
        [255, 255, 255],
        "transparent GIF pixel"
    );
    assert_eq!(got.get_pixel(0, 0).0, [200, 10, 10], "opaque GIF pixel");
}

#[test]
fn decode_grey_and_16_bit_like_pillow() {
    let grey = ImageBuffer::from_fn(2, 1, |x, _| Luma([(x * 200 + 7) as u8]));
    let got = decode(
        &encode(DynamicImage::ImageLuma8(grey), ImageFormat::Png),
        "grey png",
    );
    assert_eq!(
        got.as_raw(),
        &vec![7, 7, 7, 207, 207, 207],
        "grey replicated to RGB"
    );

    // 16-bit RGB: Pillow keeps the high byte (0x12ff -> 0x12, not the rounded 0x13).
    let rgb16 = ImageBuffer::from_fn(1, 1, |_, _| Rgb([0x12ffu16, 0x00ff, 0xff00]));
    let got = decode(
        &encode(DynamicImage::ImageRgb16(rgb16), ImageFormat::Png),
        "rgb16 png",
    );
    assert_eq!(
        got.as_raw(),
        &vec![0x12, 0x00, 0xff],
        "16-bit RGB high bytes"
    );

    // 16-bit grey: Pillow opens it as mode I;16, whose RGB conversion clips at 255.
    let g16 = ImageBuffer::from_fn(3, 1, |x, _| Luma([[100u16, 255, 40000][x as usize]]));
    let got = decode(
        &encode(DynamicImage::ImageLuma16(g16), ImageFormat::Png),
        "grey16 png",
    );
    assert_eq!(
        got.as_raw(),
        &vec![100, 100, 100, 255, 255, 255, 255, 255, 255],
        "16-bit grey clipped"
    );
}

#[test]
fn decode_applies_exif_orientation() {
    // A PNG eXIf chunk with orientation 6 (rotate 90 degrees clockwise), as exif_transpose reads it.
    let exif: Vec<u8> = [
        &b"MM\0\x2a\0\0\0\x08"[..],
        &[0, 1],
        &[0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 6, 0, 0],
        &[0, 0, 0, 0],
    ]
    .concat();
    let img = sample_rgb(3, 2);
    let mut bytes = Vec::new();
    {
        use image::ImageEncoder;
        let mut enc = image::codecs::png::PngEncoder::new(&mut bytes);
        if let Err(e) = enc.set_exif_metadata(exif) {
            panic!("test setup: PNG encoder refused EXIF: {e}");
        }
        if let Err(e) = enc.write_image(img.as_raw(), 3, 2, image::ExtendedColorType::Rgb8) {
            panic!("test setup: PNG encoding failed: {e}");
        }
    }
    let got = decode(&bytes, "exif png");
    assert_eq!(
        got.dimensions(),
        (2, 3),
        "orientation 6 swaps width and height"
    );
    // Rotating clockwise puts the source's bottom-left pixel at the top-left.
    assert_eq!(got.get_pixel(0, 0), img.get_pixel(0, 1));
    assert_eq!(got.get_pixel(1, 0), img.get_pixel(0, 0));
}

#[test]
fn decode_rejects_garbage_truncated_and_empty_input_without_panicking() {
    let png = encode(
        DynamicImage::ImageRgb8(sample_rgb(32, 32)),
        ImageFormat::Png,
    );
    let jpeg = encode(
        DynamicImage::ImageRgb8(sample_rgb(32, 32)),
        ImageFormat::Jpeg,
    );
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("text", b"hello, this is not an image".to_vec()),
        ("truncated png", png[..png.len() / 2].to_vec()),
        ("png signature only", png[..8].to_vec()),
        ("truncated jpeg", jpeg[..jpeg.len() / 3].to_vec()),
        ("zero-size png", png_header_only(0, 0)),
        ("decompression-bomb png", png_header_only(20_000, 20_000)),
    ];
    for (what, bytes) in cases {
        match decode_image(&bytes, what) {
            Ok(img) => panic!(
                "{what}: decoded to {}x{} instead of failing",
                img.width(),
                img.height()
            ),
            Err(e) => assert!(
                e.to_string().contains(what),
                "{what}: error should name the input: {e}"
            ),
        }
    }
    match load_image(Path::new("/nonexistent/picture.png")) {
        Err(ImageError::Io { path, .. }) => {
            assert_eq!(path, PathBuf::from("/nonexistent/picture.png"))
        }
        other => panic!("missing file should be an Io error, got {other:?}"),
    }
}

/// A PNG declaring `width x height` RGB8 pixels with an empty image stream (valid CRCs).
fn png_header_only(width: u32, height: u32) -> Vec<u8> {
    fn crc32(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
    fn chunk(kind: &[u8], data: &[u8]) -> Vec<u8> {
        let body = [kind, data].concat();
        [
            &(data.len() as u32).to_be_bytes()[..],
            &body,
            &crc32(&body).to_be_bytes(),
        ]
        .concat()
    }
    let ihdr = [
        &width.to_be_bytes()[..],
        &height.to_be_bytes(),
        &[8, 2, 0, 0, 0],
    ]
    .concat();
    // zlib stream of zero bytes of image data.
    let idat = [0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01];
    [
        &b"\x89PNG\r\n\x1a\n"[..],
        &chunk(b"IHDR", &ihdr),
        &chunk(b"IDAT", &idat),
        &chunk(b"IEND", &[]),
    ]
    .concat()
}

// ---------------------------------------------------------------- resize

/// Deterministic test pattern with saturated pixels to exercise the clamp.
fn pattern(h: usize, w: usize) -> RgbImage {
    ImageBuffer::from_fn(w as u32, h as u32, |x, y| {
        let (x, y) = (x as usize, y as usize);
        Rgb(std::array::from_fn(|c| {
            if (x + 2 * y) % 7 == 0 {
                255
            } else if (x * 3 + y) % 11 == 0 {
                0
            } else {
                ((x * 37 + y * 91 + c * 53 + (x * y * 13) % 97) % 256) as u8
            }
        }))
    })
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap_or(0))
        .collect()
}

/// Outputs of `torchvision.transforms.v2.functional.resize(BICUBIC, antialias=True)` (torchvision
/// 0.29.2, torch 2.15 CPU) on `pattern(h, w)` as a uint8 [1, 3, h, w] tensor, HWC hex.
const TORCHVISION_RESIZES: [(usize, usize, usize, usize, &str); 5] = [
    (5, 7, 11, 16, "fffffff5f5f77d9bb6184e841951963b6fbc4b88cf5aa4de6fb9f28cc9ffa1d7fbaaf381b2f012c98e0ee01c31ec003de8eff9d6e1f07a9ec42f689d357297568d9f6992ab798fbe8197d480a9ed89bfe6a6e791c2f341cea340d1405bd419638cade28ab0e66fa9e961a8da78c3999ad759b3a853c55a6fac4289625ca24e87b49fcdb3ecfdb0dad7b6ab9ac09a82c3558eb46196c17ca7e799beefa8e296b6f434d8b62bfc4d50d2256955367726629591b7d3f9fbffdbecff97c1f17eb2ea8ad25a97bd67b98987cc659d9d7d8770a26ca0a97dfaa1a3e992b16b76a52d79af71bcecbfedffc7b9e5b96b9fb65583b0fd1abfd626e87541f3286194327b385f976ba1c3e4eff4eef3f98aaccf4e86bd65aee68ec7fcae7aafc9194ed5002762a62d809f44d18c7eff7da8b98087638d6579bb9cc3f6fbd6e7ffb58bb89e4f86a55a90a9639b9340787b164f710f3e073c64315e82a7b0d3fff2fbe4f190a8d81f97da5999dee3aab2f4cd5491e21247e40635ce053a801c522c3a7109477d174a9f3b6ea79dc5bfebffbde6ff65c0f31397d54469aeb5647dc8863f80a21a4eae1a4cac295e8c56836687ab5197ba558ad86a9ebfa0d383cdfe48d5ff2ac3f8208cc3423e767e1a4a911d39792e3f744b5c937183b9a6b4d6d5dfebddeaf16da2f17cb1caa1d96bc1fb18cfff10c6fb2488bb412a5e67003379003675004e832276af59a7ddb0dbf8ffffffffffff"),
    (23, 37, 6, 9, "96a29892849881867b9297859c95769a857a9e8e768388819e807683938289887b6b879280818ba06e89927a8a7f9c837081897f8a707c7f95847e8d8c818b7e899c78969882878583798d7c8883778c8f87a58294986f8c936c89848f93868da1868483779e77918f718994918f7d9f8b709d86748e9780998f78a1937d948b858c82868b7e89887f958b847a98688c8d858e828c93878380888d7b848397878b8f"),
    (13, 10, 29, 4, "7597c16ab1cede9c6c6887c0799fbf78a6bbcc9d7d6b8db181b2be998a8ba0a1a872a08d8eb8aeb07d757e99c2789e6fa6987ea399ab817aac746267b77e5996b4db8a598d75376cac9271aca6c0803f7f90738698b79bc48b8a743479aecda09acf979f7c74835f8dabdf86a8de7553736ea3b1b291c44b99cc5c3a7474add8a5679b3d67954854818a9fd660255b5b507a567c8c8e92bb3f134a86649b9ebb94708b7b675291c685b8d9da935a854d899bc9ebadaad294786b7c656ed49ebecb89ad395d8b788f4af45d7fa9577b346fad8f915fbd557f661f415d99ceb2808f56689e4e2b407eafccab6c9e315b905c77749eb6aa7c528f42315a73ada4a6a08a63578c6b31489ac3d0885d6a6b8b9ebc7869a8c1e274345e7eb7a9e5ac8e7291c08d5680a1c49c9d99ae39638da98aa7b8be8a4a7cba4979669b9aa08d998857918073a8477f9c884d6c8b88b43284bb39739e7f33598c9ac211"),
    (9, 40, 9, 13, "6e99c69aaea0a691a34c7375b98b7d66a2a3caa550617893bbb9519496bf6a825a9f789874b0a097ac9aa48e9f6e908ea8847fa5d9b6a180519fa69ac57e3a9d9eb4798e3199808ba79f7f712b5fb1897292a0ce80336eadc99e7f7d47968a89b2bc717171999b5b43826b79ab9fb4954c3195b3d59dc49ead4d6e889ea16c462f5171aabea4a27d4b4ba5bb9ab1995d8bafca7963437f8ba0d0bd4994ca5e54829aabd4662d6390b6d385744d3186a4cdb24a7f7096c29562485a889dbde6831d4549486e599ab9783970557cabd8974466a28cb9d43b6854497ba5c75e3a7483b3c1af5c3d4084b1db98c3c7c55f53849dcc729e762c6ca4d4749a942f5db5e2c27fb4747ca1d129486d5d968ae86f73ac7aa635676dcf83675d478a94c0b955796dadccaf8061833b6d98b3986d566f4fd2bd7c3b3c684b2d519fabd263599099d2b684637b567fb5b48dba3b593db3c5725a468889b3843f5f8294cb63"),
    (31, 3, 8, 3, "86b497ac98ab7eb35989a38a9a95907793627567928384965e927f81a97f6a9495acd19a72a67eb09986456e756c8b8780718aa68ab87e6d89939fceb980b0a0c385898368cf6c97"),
];

#[test]
fn resize_matches_torchvision_bicubic_antialias_bit_for_bit() {
    for (h, w, oh, ow, want) in TORCHVISION_RESIZES {
        let got = resize_bicubic_u8(&pattern(h, w), oh, ow);
        assert_eq!(
            got.dimensions(),
            (ow as u32, oh as u32),
            "{h}x{w} -> {oh}x{ow}: output size"
        );
        let (max, n) = u8_diff(got.as_raw(), &hex(want));
        assert_eq!(
            max, 0,
            "{h}x{w} -> {oh}x{ow}: {n} values differ from torchvision, by up to {max} levels"
        );
    }
}

#[test]
fn resize_to_same_size_is_identity() {
    let img = pattern(17, 9);
    assert_eq!(resize_bicubic_u8(&img, 17, 9), img);
}

// ---------------------------------------------------------------- normalise + patchify

#[test]
fn normalisation_matches_transformers_f32_bits() {
    // Bits of transformers' pixel_values for levels 0, 128, 255 in channels R, G, B.
    let clip = [
        [0xbfe568dcu32, 0xbfe044b7, 0xbfbd77d8],
        [0x3d9c560e, 0x3e2cf360, 0x3eae0dc1],
        [0x3ff71542, 0x4004cae4, 0x40095661],
    ];
    let half = [[0xbf800000u32; 3], [0x3b808081; 3], [0x3f800000; 3]];
    for (text, want) in [(QWEN2_CONFIG, clip), (QWEN3_CONFIG, half)] {
        let cfg = parse(text);
        let f = cfg.factor() as u32;
        for (level, want_bits) in [0u8, 128, 255].into_iter().zip(want) {
            let img = ImageBuffer::from_pixel(f, f, Rgb([level; 3]));
            let pv = normalize_and_patchify(&img, &cfg)
                .unwrap_or_else(|e| panic!("patchify failed: {e}"));
            let plane = cfg.temporal_patch_size * cfg.patch_size * cfg.patch_size;
            for (c, bits) in want_bits.into_iter().enumerate() {
                let got = pv.data[c * plane];
                assert_eq!(
                    got.to_bits(),
                    bits,
                    "level {level} channel {c}: {got} vs {}",
                    f32::from_bits(bits)
                );
            }
        }
    }
}

#[test]
fn patch_rows_follow_merge_block_order_with_temporal_copies() {
    // Rescale and normalise off: values are the raw levels, so each row can be traced back.
    let mut cfg = parse(QWEN2_CONFIG);
    cfg.do_rescale = false;
    cfg.do_normalize = false;
    let (p, t) = (cfg.patch_size, cfg.temporal_patch_size);
    // 56 x 84 pixels -> 4 x 6 patches; each pixel encodes its patch (row, col) in R and G.
    let img: RgbImage = ImageBuffer::from_fn(84, 56, |x, y| {
        Rgb([(y as usize / p) as u8, (x as usize / p) as u8, 0])
    });
    let pv = normalize_and_patchify(&img, &cfg).unwrap_or_else(|e| panic!("patchify failed: {e}"));
    assert_eq!(
        (pv.rows, pv.cols, pv.grid_thw),
        (24, 3 * t * p * p, [1, 4, 6])
    );
    let decode_level = |v: f32| v as usize;
    for (i, row) in pv.data.chunks_exact(pv.cols).enumerate() {
        // Rows: block row, block col (3 blocks per row), then 2x2 inside the block.
        let (block, k) = (i / 4, i % 4);
        let want = (block / 3 * 2 + k / 2, block % 3 * 2 + k % 2);
        let got = (decode_level(row[0]), decode_level(row[t * p * p]));
        assert_eq!(got, want, "row {i}: patch (row, col)");
        for c in 0..3 {
            let plane = &row[c * t * p * p..(c + 1) * t * p * p];
            assert_eq!(
                plane[..p * p],
                plane[p * p..],
                "row {i} channel {c}: temporal copies differ"
            );
        }
    }
}

#[test]
fn preprocess_rejects_unaligned_image_when_resize_is_off() {
    let mut cfg = parse(QWEN2_CONFIG);
    cfg.do_resize = false;
    assert!(
        preprocess(&pattern(30, 28), &cfg).is_err(),
        "30 is not a multiple of 28"
    );
    let pv = preprocess(&pattern(56, 28), &cfg)
        .unwrap_or_else(|e| panic!("aligned image should pass: {e}"));
    assert_eq!((pv.resized_hw, pv.grid_thw), ((56, 28), [1, 4, 2]));
}

// ---------------------------------------------------------------- goldens

fn goldens_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/goldens"));
    if dir.is_dir() {
        Some(dir)
    } else {
        println!(
            "golden check skipped: {} not found (the goldens are optional)",
            dir.display()
        );
        None
    }
}

fn tensor_bytes(st: &safetensors::SafeTensors, name: &str, what: &str) -> (Vec<usize>, Vec<u8>) {
    match st.tensor(name) {
        Ok(t) => (t.shape().to_vec(), t.data().to_vec()),
        Err(e) => panic!("{what}: tensor {name} missing: {e}"),
    }
}

#[test]
fn preprocessing_matches_hf_goldens_bit_for_bit() {
    let Some(dir) = goldens_dir() else { return };
    let mut checked = 0;
    for family in ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"] {
        let fdir = dir.join(family);
        let cfg = PreprocessConfig::from_file(&fdir.join("preprocessor_config.json"))
            .unwrap_or_else(|e| panic!("{e}"));
        for tag in ["img", "img2"] {
            let json_path = fdir.join(format!("golden_{tag}.json"));
            if !json_path.exists() {
                continue;
            }
            let what = format!("{family}/golden_{tag}");
            let meta: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap_or_default())
                    .unwrap_or_default();
            let images: Vec<String> = meta["images"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            assert!(!images.is_empty(), "{what}: json lists no images");
            let st_bytes = std::fs::read(fdir.join(format!("golden_{tag}.safetensors")))
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            let st = safetensors::SafeTensors::deserialize(&st_bytes)
                .unwrap_or_else(|e| panic!("{what}: {e}"));

            let mut rows = Vec::new();
            let mut grids = Vec::new();
            for (i, name) in images.iter().enumerate() {
                let img = load_image(&fdir.join(name)).unwrap_or_else(|e| panic!("{e}"));
                let pv = preprocess(&img, &cfg).unwrap_or_else(|e| panic!("{what}: {e}"));
                let (shape, want) = tensor_bytes(&st, &format!("resized_u8_{i}"), &what);
                let (rh, rw) = pv.resized_hw;
                assert_eq!(shape, vec![rh, rw, 3], "{what}: image {i} resized shape");
                let resized = resize_bicubic_u8(&img, rh, rw);
                let (max, n) = u8_diff(resized.as_raw(), &want);
                println!("{what}: resized_u8_{i} {rh}x{rw}: max abs diff {max} levels ({n} values differ)");
                assert_eq!(
                    max, 0,
                    "{what}: resized_u8_{i}: {n} values differ by up to {max} levels"
                );

                // Normalisation alone, from the golden resized pixels.
                let golden_resized =
                    RgbImage::from_raw(rw as u32, rh as u32, want).unwrap_or_default();
                let from_golden = normalize_and_patchify(&golden_resized, &cfg)
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_eq!(
                    from_golden.data, pv.data,
                    "{what}: image {i}: pixel values from golden resized_u8 differ"
                );
                rows.extend_from_slice(&pv.data);
                grids.extend(pv.grid_thw.map(|v| v as i64));
            }

            let (shape, want) = tensor_bytes(&st, "pixel_values", &what);
            let want: Vec<f32> = want
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            assert_eq!(
                shape.iter().product::<usize>(),
                rows.len(),
                "{what}: pixel_values shape {shape:?}"
            );
            let max = rows
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let n_bits = rows
                .iter()
                .zip(&want)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            println!("{what}: pixel_values {shape:?}: max abs diff {max:e} ({n_bits} values not bit-equal)");
            assert_eq!(
                n_bits, 0,
                "{what}: {n_bits} pixel_values differ, max abs diff {max:e}"
            );

            let (_, want) = tensor_bytes(&st, "image_grid_thw", &what);
            let want: Vec<i64> = want
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
                .collect();
            assert_eq!(grids, want, "{what}: image_grid_thw");
            checked += 1;
        }
    }
    assert!(
        checked >= 4,
        "expected at least 4 image goldens, checked {checked}"
    );
}
