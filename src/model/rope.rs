//! Rotary position embeddings: the 3-D M-RoPE position ids of HF `get_rope_index`, the 2-D
//! vision positions, and the cos/sin tables (computed on the host in f32 as HF does, with each
//! value correctly rounded).

use burn::tensor::{Device, Tensor, TensorData};

use crate::config::TextConfig;

/// `[t; h; w]` positions of every prompt token plus the decode offset.
#[derive(Debug, Clone, PartialEq)]
pub struct MropePositions {
    /// `[3][seq]`
    pub ids: [Vec<i64>; 3],
    /// `max(position) + 1 - seq`: the token at sequence index `i >= seq` gets position `i + delta`.
    pub rope_delta: i64,
}

/// HF `get_rope_index` for images (t = 1 per image after temporal patching).
///
/// Text tokens count up by one; an image block whose first token would sit at position `p` with
/// merged grid `(t, h', w')` gets `(p + ti, p + row, p + col)` and the text after it resumes at
/// `p + max(t, h', w')`. `image_grids` are `[t, h, w]` in patches, one per run of `image_token_id`.
pub fn mrope_positions(
    ids: &[u32],
    image_token_id: u32,
    image_grids: &[[usize; 3]],
    merge: usize,
) -> MropePositions {
    let mut out: [Vec<i64>; 3] = [
        Vec::with_capacity(ids.len()),
        Vec::with_capacity(ids.len()),
        Vec::with_capacity(ids.len()),
    ];
    let mut next: i64 = 0; // the position the next text token gets
    let mut i = 0;
    let mut image = 0;
    while i < ids.len() {
        if ids[i] == image_token_id && image < image_grids.len() {
            let [t, h, w] = image_grids[image];
            let (h, w) = (h / merge, w / merge);
            let p = next;
            for ti in 0..t {
                for r in 0..h {
                    for c in 0..w {
                        out[0].push(p + ti as i64);
                        out[1].push(p + r as i64);
                        out[2].push(p + c as i64);
                    }
                }
            }
            i += t * h * w;
            next = p + t.max(h).max(w) as i64;
            image += 1;
        } else {
            for row in out.iter_mut() {
                row.push(next);
            }
            next += 1;
            i += 1;
        }
    }
    // The caller checked that the image pads match the grids; keep the lengths equal regardless.
    for row in out.iter_mut() {
        row.truncate(ids.len());
    }
    let max = out
        .iter()
        .flat_map(|r| r.iter().copied())
        .max()
        .unwrap_or(-1);
    MropePositions {
        rope_delta: max + 1 - ids.len() as i64,
        ids: out,
    }
}

/// `(row, col)` of every patch in its image's patch grid, in the processor's 2x2-merge-block order.
pub fn vision_positions(grids: &[[usize; 3]], merge: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for &[t, h, w] in grids {
        for _ in 0..t {
            for br in 0..h / merge {
                for bc in 0..w / merge {
                    for r in 0..merge {
                        for c in 0..merge {
                            out.push((br * merge + r, bc * merge + c));
                        }
                    }
                }
            }
        }
    }
    out
}

/// `1 / base^(2i / dim)` for `i < dim / 2`, in f32 (correctly rounded).
pub fn inv_freq(base: f64, dim: usize) -> Vec<f32> {
    (0..dim / 2)
        .map(|i| {
            let exponent = ((2 * i) as f32 / dim as f32) as f64;
            (1.0 / base.powf(exponent)) as f32
        })
        .collect()
}

/// cos/sin tables `[seq, half]` as host vectors.
pub struct RopeTable {
    /// `[seq * half]`
    pub cos: Vec<f32>,
    /// `[seq * half]`
    pub sin: Vec<f32>,
    /// Rows.
    pub seq: usize,
    /// Columns (head_dim / 2).
    pub half: usize,
}

impl RopeTable {
    /// Builds the table from the f32 angle of each (row, frequency).
    fn from_angles(seq: usize, half: usize, angle: impl Fn(usize, usize) -> f32) -> Self {
        let mut cos = Vec::with_capacity(seq * half);
        let mut sin = Vec::with_capacity(seq * half);
        for s in 0..seq {
            for j in 0..half {
                let a = angle(s, j) as f64;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        RopeTable {
            cos,
            sin,
            seq,
            half,
        }
    }

    /// Uploads as two `[seq, half]` f32 tensors.
    pub fn upload(&self, device: &Device) -> (Tensor<2>, Tensor<2>) {
        let shape = [self.seq, self.half];
        (
            Tensor::from_data(
                TensorData::new(self.cos.clone(), shape),
                (device, burn::tensor::DType::F32),
            ),
            Tensor::from_data(
                TensorData::new(self.sin.clone(), shape),
                (device, burn::tensor::DType::F32),
            ),
        )
    }
}

/// Which position component (0 = t, 1 = h, 2 = w) drives rotary frequency `j`.
pub fn mrope_component(cfg: &TextConfig, j: usize) -> usize {
    let s = cfg.mrope_section;
    if cfg.mrope_interleaved {
        if j % 3 == 1 && j < 3 * s[1] {
            1
        } else if j % 3 == 2 && j < 3 * s[2] {
            2
        } else {
            0
        }
    } else if j < s[0] {
        0
    } else if j < s[0] + s[1] {
        1
    } else {
        2
    }
}

/// Text M-RoPE table for the given `[3][seq]` positions.
pub fn text_rope(cfg: &TextConfig, positions: &[Vec<i64>; 3]) -> RopeTable {
    let inv = inv_freq(cfg.rope_theta, cfg.head_dim);
    let comp: Vec<usize> = (0..inv.len()).map(|j| mrope_component(cfg, j)).collect();
    RopeTable::from_angles(positions[0].len(), inv.len(), |s, j| {
        positions[comp[j]][s] as f32 * inv[j]
    })
}

/// Vision 2-D RoPE table: frequencies `[row * f, col * f]` with `f` over head_dim / 4 values.
pub fn vision_rope(head_dim: usize, positions: &[(usize, usize)]) -> RopeTable {
    let inv = inv_freq(10000.0, head_dim / 2);
    let q = inv.len();
    RopeTable::from_angles(positions.len(), 2 * q, |s, j| {
        let (r, c) = positions[s];
        if j < q {
            r as f32 * inv[j]
        } else {
            c as f32 * inv[j - q]
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_after_image_resumes_at_max_grid_side() {
        // 2 text tokens, an image of 2x3 merged tokens (grid 1x4x6 patches), 2 text tokens.
        let img = 9;
        let ids = [1, 2, img, img, img, img, img, img, 3, 4];
        let p = mrope_positions(&ids, img, &[[1, 4, 6]], 2);
        assert_eq!(p.ids[0], vec![0, 1, 2, 2, 2, 2, 2, 2, 5, 6]);
        assert_eq!(p.ids[1], vec![0, 1, 2, 2, 2, 3, 3, 3, 5, 6]);
        assert_eq!(p.ids[2], vec![0, 1, 2, 3, 4, 2, 3, 4, 5, 6]);
        assert_eq!(p.rope_delta, 7 - 10);
    }

    #[test]
    fn vision_positions_follow_merge_blocks() {
        let p = vision_positions(&[[1, 2, 4]], 2);
        assert_eq!(
            p,
            vec![
                (0, 0),
                (0, 1),
                (1, 0),
                (1, 1),
                (0, 2),
                (0, 3),
                (1, 2),
                (1, 3)
            ]
        );
    }
}
