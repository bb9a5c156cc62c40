//! Draws the pipeline's boxes and step numbers on the image (`--annotate out.png`).

use image::{Rgb, RgbImage};

/// 3x5 bitmaps of the digits 0-9, one row per 3-bit group, most significant bit left.
const DIGITS: [[u8; 5]; 10] = [
    [7, 5, 5, 5, 7],
    [2, 6, 2, 2, 7],
    [7, 1, 7, 4, 7],
    [7, 1, 3, 1, 7],
    [5, 5, 7, 1, 1],
    [7, 4, 7, 1, 7],
    [7, 4, 7, 5, 7],
    [7, 1, 1, 1, 1],
    [7, 5, 7, 5, 7],
    [7, 5, 7, 1, 7],
];

const COLOURS: [Rgb<u8>; 6] = [
    Rgb([230, 25, 75]),
    Rgb([60, 180, 75]),
    Rgb([0, 130, 200]),
    Rgb([245, 130, 48]),
    Rgb([145, 30, 180]),
    Rgb([70, 240, 240]),
];

fn fill(img: &mut RgbImage, x0: i64, y0: i64, w: i64, h: i64, c: Rgb<u8>) {
    for y in y0.max(0)..(y0 + h).min(img.height() as i64) {
        for x in x0.max(0)..(x0 + w).min(img.width() as i64) {
            img.put_pixel(x as u32, y as u32, c);
        }
    }
}

/// Draws each `(label number, [x1, y1, x2, y2])` as a rectangle with its number in a tag at the
/// top-left corner; line width and digit size scale with the image.
pub fn annotate(image: &RgbImage, boxes: &[(usize, [f32; 4])]) -> RgbImage {
    let mut out = image.clone();
    let side = image.width().min(image.height()) as i64;
    let t = (side / 200).max(1);
    let s = (side / 100).max(2);
    for (k, &(n, b)) in boxes.iter().enumerate() {
        let c = COLOURS[k % COLOURS.len()];
        let (x1, y1, x2, y2) = (b[0] as i64, b[1] as i64, b[2] as i64, b[3] as i64);
        fill(&mut out, x1, y1, x2 - x1, t, c);
        fill(&mut out, x1, y2 - t, x2 - x1, t, c);
        fill(&mut out, x1, y1, t, y2 - y1, c);
        fill(&mut out, x2 - t, y1, t, y2 - y1, c);
        let digits: Vec<usize> = n.to_string().bytes().map(|d| (d - b'0') as usize).collect();
        let tag_w = digits.len() as i64 * 4 * s + s;
        fill(&mut out, x1, y1, tag_w, 7 * s, c);
        for (i, &d) in digits.iter().enumerate() {
            for (row, bits) in DIGITS[d].iter().enumerate() {
                for col in 0..3 {
                    if bits & (4 >> col) != 0 {
                        let x = x1 + s + i as i64 * 4 * s + col * s;
                        fill(
                            &mut out,
                            x,
                            y1 + s + row as i64 * s,
                            s,
                            s,
                            Rgb([255, 255, 255]),
                        );
                    }
                }
            }
        }
    }
    out
}
