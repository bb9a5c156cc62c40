//! The vision tower of each family: patch embedding, transformer blocks with 2-D RoPE, and the
//! patch merger (2x2 patches -> one LM token).
//!
//! - Qwen2-VL: LayerNorm blocks, quick-GELU MLP, LayerNorm merger.
//! - Qwen2.5-VL: RMSNorm blocks, gated SiLU MLP, window attention outside
//!   `fullatt_block_indexes` (patches reordered by window before the blocks, restored after the
//!   merger), RMSNorm merger.
//! - Qwen3-VL: patch-embed bias, learned position table bilinearly resampled to the grid,
//!   LayerNorm blocks, tanh-GELU MLP, deepstack mergers tapped after some blocks.

use burn::tensor::{Device, Int, Tensor, TensorData};

use super::layers::{gelu, gelu_tanh, quick_gelu, silu, LayerNorm, Linear, Loader, Norm, RmsNorm};
use super::rope::{vision_positions, vision_rope};
use crate::config::{Family, VisionConfig};
use crate::device::Limits;
use crate::kernels;
use crate::weights::WeightsError;

const EPS: f64 = 1e-6;

// A few instances per model: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
enum Mlp {
    /// fc1 -> activation -> fc2.
    Plain {
        fc1: Linear,
        fc2: Linear,
        tanh_gelu: bool,
    },
    /// down(silu(gate x) * up x).
    Gated {
        gate: Linear,
        up: Linear,
        down: Linear,
    },
}

impl Mlp {
    fn forward(&self, x: Tensor<2>, lim: &Limits) -> Tensor<2> {
        match self {
            Mlp::Plain {
                fc1,
                fc2,
                tanh_gelu,
            } => {
                let h = fc1.forward(x, lim);
                let h = if *tanh_gelu {
                    gelu_tanh(h)
                } else {
                    quick_gelu(h)
                };
                fc2.forward(h, lim)
            }
            Mlp::Gated { gate, up, down } => {
                down.forward(silu(gate.forward(x.clone(), lim)) * up.forward(x, lim), lim)
            }
        }
    }
}

struct Block {
    norm1: Norm,
    norm2: Norm,
    qkv: Linear,
    proj: Linear,
    mlp: Mlp,
}

fn norm(l: &Loader, family: Family, prefix: &str, d: usize) -> Result<Norm, WeightsError> {
    Ok(match family {
        Family::Qwen25Vl => Norm::Rms(RmsNorm::load(l, prefix, d, EPS)?),
        _ => Norm::Layer(LayerNorm::load(l, prefix, d, EPS)?),
    })
}

impl Block {
    fn load(
        l: &Loader,
        family: Family,
        cfg: &VisionConfig,
        i: usize,
    ) -> Result<Self, WeightsError> {
        let p = format!("visual.blocks.{i}");
        let (w, m) = (cfg.width, cfg.intermediate_size);
        let mlp = match family {
            Family::Qwen2Vl => Mlp::Plain {
                fc1: Linear::load(l, &format!("{p}.mlp.fc1"), w, m, true)?,
                fc2: Linear::load(l, &format!("{p}.mlp.fc2"), m, w, true)?,
                tanh_gelu: false,
            },
            Family::Qwen25Vl => Mlp::Gated {
                gate: Linear::load(l, &format!("{p}.mlp.gate_proj"), w, m, true)?,
                up: Linear::load(l, &format!("{p}.mlp.up_proj"), w, m, true)?,
                down: Linear::load(l, &format!("{p}.mlp.down_proj"), m, w, true)?,
            },
            Family::Qwen3Vl => Mlp::Plain {
                fc1: Linear::load(l, &format!("{p}.mlp.linear_fc1"), w, m, true)?,
                fc2: Linear::load(l, &format!("{p}.mlp.linear_fc2"), m, w, true)?,
                tanh_gelu: true,
            },
        };
        Ok(Block {
            norm1: norm(l, family, &format!("{p}.norm1"), w)?,
            norm2: norm(l, family, &format!("{p}.norm2"), w)?,
            qkv: Linear::load(l, &format!("{p}.attn.qkv"), w, 3 * w, true)?,
            proj: Linear::load(l, &format!("{p}.attn.proj"), w, w, true)?,
            mlp,
        })
    }

    /// `x`: `[n, width]`; attention inside each of `segments`.
    fn forward(
        &self,
        x: Tensor<2>,
        heads: usize,
        rope: &(Tensor<2>, Tensor<2>),
        segments: &[usize],
        limits: &Limits,
    ) -> Tensor<2> {
        let [n, w] = x.dims();
        let hd = w / heads;
        let qkv = self
            .qkv
            .forward(self.norm1.forward(x.clone()), limits)
            .reshape([n, 3, heads, hd]);
        // [n, heads, hd] -> [heads, n, hd]
        let part = |i: usize| {
            qkv.clone()
                .slice([0..n, i..i + 1, 0..heads, 0..hd])
                .reshape([n, heads, hd])
                .swap_dims(0, 1)
        };
        let q = super::layers::apply_rotary(part(0), &rope.0, &rope.1);
        let k = super::layers::apply_rotary(part(1), &rope.0, &rope.1);
        let attn = kernels::attention_segments(q, k, part(2), segments, limits);
        let attn = attn.swap_dims(0, 1).reshape([n, w]);
        let x = x + self.proj.forward(attn, limits);
        let h = self.norm2.forward(x.clone());
        x + self.mlp.forward(h, limits)
    }
}

/// Patch merger: norm, concat each 2x2 block of patches, MLP with GELU.
struct Merger {
    norm: Norm,
    /// Norm over the concatenated block (Qwen3-VL deepstack) instead of per patch.
    postshuffle: bool,
    fc1: Linear,
    fc2: Linear,
}

impl Merger {
    fn load(
        l: &Loader,
        family: Family,
        cfg: &VisionConfig,
        prefix: &str,
        postshuffle: bool,
    ) -> Result<Self, WeightsError> {
        let unit = cfg.spatial_merge_size * cfg.spatial_merge_size;
        let wide = cfg.width * unit;
        let norm_d = if postshuffle { wide } else { cfg.width };
        let (norm_name, fc1, fc2) = match family {
            Family::Qwen3Vl => ("norm", "linear_fc1", "linear_fc2"),
            _ => ("ln_q", "mlp.0", "mlp.2"),
        };
        Ok(Merger {
            norm: norm(l, family, &format!("{prefix}.{norm_name}"), norm_d)?,
            postshuffle,
            fc1: Linear::load(l, &format!("{prefix}.{fc1}"), wide, wide, true)?,
            fc2: Linear::load(
                l,
                &format!("{prefix}.{fc2}"),
                wide,
                cfg.out_hidden_size,
                true,
            )?,
        })
    }

    /// `[n, width] -> [n / unit, out_hidden]`
    fn forward(&self, x: Tensor<2>, unit: usize, lim: &Limits) -> Tensor<2> {
        let [n, w] = x.dims();
        let x = if self.postshuffle {
            self.norm.forward(x.reshape([n / unit, w * unit]))
        } else {
            self.norm.forward(x).reshape([n / unit, w * unit])
        };
        self.fc2.forward(gelu(self.fc1.forward(x, lim)), lim)
    }
}

/// What the vision tower hands the language model.
pub struct VisionOutput {
    /// `[tokens, hidden]`: merged embeddings, all images concatenated in order.
    pub embeds: Tensor<2>,
    /// Qwen3-VL: one `[tokens, hidden]` feature per deepstack tap.
    pub deepstack: Vec<Tensor<2>>,
}

/// Intermediate tensors for parity tests.
pub struct VisionTrace {
    /// Patch-embedding output, processor order `[n, width]`.
    pub patch_embed: Tensor<2>,
    /// Input of block 0 in processor order (Qwen3-VL adds the position embedding).
    pub block0_input: Tensor<2>,
    /// Output of the last block in processor order.
    pub last_hidden: Tensor<2>,
}

/// The vision tower.
pub struct VisionTower {
    family: Family,
    cfg: VisionConfig,
    /// `[C*T*P*P, width]`
    patch_embed: Linear,
    /// Qwen3-VL: `[n*n, width]`.
    pos_embed: Option<Tensor<2>>,
    blocks: Vec<Block>,
    merger: Merger,
    deepstack: Vec<Merger>,
    limits: Limits,
}

impl VisionTower {
    /// Loads `visual.*`.
    pub fn load(
        l: &Loader,
        family: Family,
        cfg: &VisionConfig,
        limits: Limits,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Self, WeightsError> {
        let (c, t, p, w) = (
            cfg.in_channels,
            cfg.temporal_patch_size,
            cfg.patch_size,
            cfg.width,
        );
        let d_in = c * t * p * p;
        // Conv3d with kernel = stride is one matmul over the flattened (C, T, P, P) patch row.
        let patch_embed = Linear {
            weight: l.matrix_rows("visual.patch_embed.proj", [w, d_in], &[w, c, t, p, p], 0, w)?,
            bias: if family == Family::Qwen3Vl {
                Some(l.vector("visual.patch_embed.proj.bias", w)?)
            } else {
                None
            },
        };
        let pos_embed = if family == Family::Qwen3Vl {
            Some(l.tensor("visual.pos_embed.weight", [cfg.num_position_embeddings, w])?)
        } else {
            None
        };
        let mut blocks = Vec::with_capacity(cfg.depth);
        for i in 0..cfg.depth {
            blocks.push(Block::load(l, family, cfg, i)?);
            progress(&format!("visual.blocks.{i}"));
        }
        let merger = Merger::load(l, family, cfg, "visual.merger", false)?;
        let deepstack = (0..cfg.deepstack_visual_indexes.len())
            .map(|i| {
                Merger::load(
                    l,
                    family,
                    cfg,
                    &format!("visual.deepstack_merger_list.{i}"),
                    true,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(VisionTower {
            family,
            cfg: cfg.clone(),
            patch_embed,
            pos_embed,
            blocks,
            merger,
            deepstack,
            limits,
        })
    }

    /// Runs the tower over `pixel_values` (`[patches, C*T*P*P]`, processor order) of images with
    /// patch grids `grids`.
    pub fn forward(&self, pixel_values: Tensor<2>, grids: &[[usize; 3]]) -> VisionOutput {
        self.run(pixel_values, grids, None)
    }

    /// [`forward`](Self::forward) that also returns intermediates.
    pub fn forward_traced(
        &self,
        pixel_values: Tensor<2>,
        grids: &[[usize; 3]],
    ) -> (VisionOutput, VisionTrace) {
        let mut trace = None;
        let out = self.run(pixel_values, grids, Some(&mut trace));
        (
            out,
            trace.unwrap_or_else(|| unreachable!("run fills the trace when asked")),
        )
    }

    fn run(
        &self,
        pixel_values: Tensor<2>,
        grids: &[[usize; 3]],
        trace: Option<&mut Option<VisionTrace>>,
    ) -> VisionOutput {
        let device = pixel_values.device();
        let merge = self.cfg.spatial_merge_size;
        let unit = merge * merge;
        let patch_embed = self.patch_embed.forward(pixel_values, &self.limits); // [n, width]
        let mut x = patch_embed.clone();
        if let Some(table) = &self.pos_embed {
            x = x + self.interpolated_pos_embed(table, grids, &device);
        }
        let block0_input = x.clone();
        let positions = vision_positions(grids, merge);
        let image_segments: Vec<usize> = grids.iter().map(|g| g[0] * g[1] * g[2]).collect();

        // Qwen2.5-VL: reorder merge units into window order; attention segments per window.
        let window = (self.family == Family::Qwen25Vl).then(|| {
            window_order(
                grids,
                merge,
                self.cfg.window_size / merge / self.cfg.patch_size,
            )
        });
        let (positions, window_segments) = match &window {
            Some((order, segs)) => {
                let idx = patch_index(order, unit);
                x = x.select(0, int_tensor(&idx, &device));
                let pos = idx
                    .iter()
                    .map(|&i| positions[i as usize])
                    .collect::<Vec<_>>();
                (pos, segs.clone())
            }
            None => (positions, image_segments.clone()),
        };
        let rope = vision_rope(self.cfg.head_dim(), &positions).upload(&device);

        let mut deepstack = Vec::new();
        for (i, block) in self.blocks.iter().enumerate() {
            let segs = if window.is_some() && !self.cfg.fullatt_block_indexes.contains(&i) {
                &window_segments
            } else {
                &image_segments
            };
            x = block.forward(x, self.cfg.num_heads, &rope, segs, &self.limits);
            if let Some(k) = self
                .cfg
                .deepstack_visual_indexes
                .iter()
                .position(|&b| b == i)
            {
                deepstack.push(self.deepstack[k].forward(x.clone(), unit, &self.limits));
            }
        }
        let mut embeds = self.merger.forward(x.clone(), unit, &self.limits);
        let mut last_hidden = x;
        if let Some((order, _)) = &window {
            let inverse = argsort(order);
            embeds = embeds.select(0, int_tensor(&inverse, &device));
            if trace.is_some() {
                last_hidden =
                    last_hidden.select(0, int_tensor(&patch_index(&inverse, unit), &device));
            }
        }
        if let Some(slot) = trace {
            *slot = Some(VisionTrace {
                patch_embed,
                block0_input,
                last_hidden,
            });
        }
        VisionOutput { embeds, deepstack }
    }

    /// Qwen3-VL: the learned `n x n` position table resampled bilinearly (align_corners) to each
    /// image's patch grid, repeated over t, in merge-block order: `[patches, width]`.
    fn interpolated_pos_embed(
        &self,
        table: &Tensor<2>,
        grids: &[[usize; 3]],
        device: &Device,
    ) -> Tensor<2> {
        let n = (self.cfg.num_position_embeddings as f64).sqrt().round() as usize;
        let merge = self.cfg.spatial_merge_size;
        let mut idx: [Vec<i64>; 4] = Default::default();
        let mut wts: [Vec<f32>; 4] = Default::default();
        for &[t, h, w] in grids {
            let hs = linspace(n, h);
            let ws = linspace(n, w);
            for _ in 0..t {
                for br in 0..h / merge {
                    for bc in 0..w / merge {
                        for r in 0..merge {
                            for c in 0..merge {
                                let (y, x) = (hs[br * merge + r], ws[bc * merge + c]);
                                let (y0, x0) = (y as usize, x as usize);
                                let (y1, x1) = ((y0 + 1).min(n - 1), (x0 + 1).min(n - 1));
                                let (dy, dx) = (y - y0 as f32, x - x0 as f32);
                                let corners = [(y0, x0), (y0, x1), (y1, x0), (y1, x1)];
                                let weights = [
                                    (1.0 - dy) * (1.0 - dx),
                                    (1.0 - dy) * dx,
                                    dy * (1.0 - dx),
                                    dy * dx,
                                ];
                                for k in 0..4 {
                                    idx[k].push((corners[k].0 * n + corners[k].1) as i64);
                                    wts[k].push(weights[k]);
                                }
                            }
                        }
                    }
                }
            }
        }
        let count = idx[0].len();
        let mut sum: Option<Tensor<2>> = None;
        for k in 0..4 {
            let rows = table.clone().select(0, int_tensor(&idx[k], device));
            let wk = Tensor::<2>::from_data(
                TensorData::new(wts[k].clone(), [count, 1]),
                (device, rows.dtype()),
            );
            let term = rows * wk;
            sum = Some(match sum {
                Some(s) => s + term,
                None => term,
            });
        }
        sum.unwrap_or_else(|| Tensor::zeros([0, self.cfg.width], device))
    }
}

/// torch.linspace(0, n - 1, steps) in f32, with torch's symmetric evaluation.
fn linspace(n: usize, steps: usize) -> Vec<f32> {
    let (start, end) = (0f32, (n - 1) as f32);
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (steps - 1 - i) as f32
            }
        })
        .collect()
}

fn int_tensor(v: &[i64], device: &Device) -> Tensor<1, Int> {
    Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), device)
}

/// Patch rows of merge units in `order` (each unit is `unit` consecutive rows).
fn patch_index(order: &[i64], unit: usize) -> Vec<i64> {
    order
        .iter()
        .flat_map(|&u| (0..unit as i64).map(move |r| u * unit as i64 + r))
        .collect()
}

fn argsort(order: &[i64]) -> Vec<i64> {
    let mut inv = vec![0i64; order.len()];
    for (i, &u) in order.iter().enumerate() {
        inv[u as usize] = i as i64;
    }
    inv
}

/// Qwen2.5-VL `get_window_index`: the merge units of every image in window order (windows of
/// `side x side` units row-major over the padded grid, units row-major inside a window, padding
/// dropped) and the patch count of each non-empty window.
pub fn window_order(grids: &[[usize; 3]], merge: usize, side: usize) -> (Vec<i64>, Vec<usize>) {
    let side = side.max(1);
    let unit = merge * merge;
    let mut order = Vec::new();
    let mut segments = Vec::new();
    let mut base = 0i64;
    for &[t, h, w] in grids {
        let (gh, gw) = (h / merge, w / merge);
        // HF pads by `side - g % side`, i.e. a whole extra (empty) window when divisible; empty
        // windows vanish, so padding to the next multiple is equivalent.
        let (nwh, nww) = (gh.div_ceil(side), gw.div_ceil(side));
        for ti in 0..t {
            for wy in 0..nwh {
                for wx in 0..nww {
                    let mut count = 0;
                    for y in wy * side..((wy + 1) * side).min(gh) {
                        for x in wx * side..((wx + 1) * side).min(gw) {
                            order.push(base + (ti * gh * gw + y * gw + x) as i64);
                            count += 1;
                        }
                    }
                    if count > 0 {
                        segments.push(count * unit);
                    }
                }
            }
        }
        base += (t * gh * gw) as i64;
    }
    (order, segments)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_every_unit_once_in_hf_order() {
        // merged grid 3 x 5, window side 2 -> windows (2x2, 2x2, 2x1, 1x2, 1x2, 1x1)
        let (order, segs) = window_order(&[[1, 6, 10]], 2, 2);
        assert_eq!(order[..4], [0, 1, 5, 6]);
        assert_eq!(order[4..8], [2, 3, 7, 8]);
        assert_eq!(order[8..10], [4, 9]);
        assert_eq!(segs, vec![16, 16, 8, 8, 8, 4]);
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(sorted, (0..15).collect::<Vec<i64>>());
    }

    #[test]
    fn linspace_matches_torch_endpoints() {
        let v = linspace(8, 5);
        assert_eq!(v[0], 0.0);
        assert_eq!(v[4], 7.0);
        assert_eq!(v[2], 3.5);
    }
}
