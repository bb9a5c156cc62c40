//! Building blocks shared by the vision tower and the decoder: linear layers, norms, rotary
//! embedding application and activations. Plain structs of tensors, loaded by canonical name.

use std::cell::Cell;

use burn::tensor::{activation, DType, Device, Tensor};

use crate::device::Limits;
pub use crate::kernels::weight::{QuantWeight, Weight};
use crate::quant::{quantizable, quantize, Scheme};
use crate::weights::{upload, Checkpoint, WeightsError};

/// What every loader needs: the checkpoint, the device, the dtype weights become and whether
/// matrices are quantized.
pub struct Loader<'a> {
    /// The opened checkpoint.
    pub ckpt: &'a Checkpoint,
    /// Target device.
    pub device: &'a Device,
    /// Target float dtype (f32 or f16).
    pub dtype: DType,
    /// Quantize matrices stored in full precision while loading (`--quant`).
    pub quant: Option<Scheme>,
    /// The scheme of matrices stored packed (config.json's `quantization_config`).
    pub packed: Option<Scheme>,
    /// Scale dtype of quantized matrices: f16, or f32 on wgpu adapters without shader-f16.
    pub scale_dtype: DType,
    /// Device bytes of the weights loaded so far.
    pub bytes: Cell<usize>,
}

impl Loader<'_> {
    /// A loader of full-precision weights.
    pub fn dense<'a>(ckpt: &'a Checkpoint, device: &'a Device, dtype: DType) -> Loader<'a> {
        Loader {
            ckpt,
            device,
            dtype,
            quant: None,
            packed: None,
            scale_dtype: DType::F16,
            bytes: Cell::new(0),
        }
    }

    fn count(&self, bytes: usize) {
        self.bytes.set(self.bytes.get() + bytes);
    }

    /// A 1-D parameter (norm weight, bias).
    pub fn vector(&self, name: &str, n: usize) -> Result<Tensor<1>, WeightsError> {
        let t = self.ckpt.tensor(name, [n], self.device, self.dtype)?;
        self.count(n * self.dtype.size());
        Ok(t)
    }

    /// A dense tensor of any rank (tables that are not multiplied by, e.g. position tables).
    pub fn tensor<const D: usize>(
        &self,
        name: &str,
        shape: [usize; D],
    ) -> Result<Tensor<D>, WeightsError> {
        let t = self.ckpt.tensor(name, shape, self.device, self.dtype)?;
        self.count(shape.iter().product::<usize>() * self.dtype.size());
        Ok(t)
    }

    /// The matrix `{prefix}.weight` (`[out, in]`).
    pub fn matrix(&self, prefix: &str, dims: [usize; 2]) -> Result<Weight, WeightsError> {
        self.matrix_rows(prefix, dims, &dims, 0, dims[0])
    }

    /// Rows `[start, end)` of the matrix `{prefix}.weight` of `dims` (`[out, in]`), stored
    /// either packed or dense as `dense_shape` (e.g. a conv kernel, flattened to `in`).
    pub fn matrix_rows(
        &self,
        prefix: &str,
        dims: [usize; 2],
        dense_shape: &[usize],
        start: usize,
        end: usize,
    ) -> Result<Weight, WeightsError> {
        let name = format!("{prefix}.weight");
        let [_, cols] = dims;
        let w = if self.ckpt.is_packed(prefix) {
            let scheme = self.packed.ok_or_else(|| {
                let (stored, file) = self.ckpt.describe(&format!("{prefix}.qweight"));
                WeightsError::Packed {
                    name: stored,
                    file,
                    message: "is a packed (quantized) tensor but config.json has no `quantization_config`".into(),
                }
            })?;
            let p = self.ckpt.packed_rows(prefix, scheme, dims, start, end)?;
            Weight::Quant(QuantWeight::upload(&p, self.device, self.scale_dtype))
        } else {
            let data = self.ckpt.rows_f32(&name, dense_shape, start, end)?;
            match self.quant {
                Some(scheme) if quantizable(&name, dense_shape) => {
                    let p = quantize(scheme, &data, end - start, cols).map_err(|source| {
                        let (name, file) = self.ckpt.describe(&name);
                        WeightsError::Quantize { name, file, source }
                    })?;
                    Weight::Quant(QuantWeight::upload(&p, self.device, self.scale_dtype))
                }
                _ => Weight::Dense(upload(data, [end - start, cols], self.device, self.dtype)),
            }
        };
        self.count(w.bytes());
        Ok(w)
    }
}

/// `y = x W^T + b`, W kept as HF stores it (`[out, in]`) and multiplied through a transposed
/// view: measured on lavapipe, a `[1, in] @ [out, in]^T` decode matvec runs about as fast as the
/// memory allows while `[1, in] @ [in, out]` (W transposed on the host) is several times slower.
pub struct Linear {
    /// `[out, in]`, dense or quantized.
    pub weight: Weight,
    /// `[out]`
    pub bias: Option<Tensor<1>>,
}

impl Linear {
    /// Loads `{prefix}.weight` (`[out, in]`) and, if `bias`, `{prefix}.bias`.
    pub fn load(
        l: &Loader,
        prefix: &str,
        d_in: usize,
        d_out: usize,
        bias: bool,
    ) -> Result<Self, WeightsError> {
        let weight = l.matrix(prefix, [d_out, d_in])?;
        let bias = if bias {
            Some(l.vector(&format!("{prefix}.bias"), d_out)?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    /// `[n, in] -> [n, out]`; one row (decode) goes through a WGSL matvec where `limits` allow.
    pub fn forward(&self, x: Tensor<2>, limits: &Limits) -> Tensor<2> {
        let y = self.weight.matmul_t(x, limits);
        match &self.bias {
            Some(b) => y + b.clone().unsqueeze::<2>(),
            None => y,
        }
    }
}

/// RMSNorm: `x * rsqrt(mean(x^2) + eps) * w`, computed in f32 as HF does.
pub struct RmsNorm {
    /// `[d]`
    pub weight: Tensor<1>,
    /// Epsilon.
    pub eps: f64,
}

impl RmsNorm {
    /// Loads `{prefix}.weight`.
    pub fn load(l: &Loader, prefix: &str, d: usize, eps: f64) -> Result<Self, WeightsError> {
        Ok(RmsNorm {
            weight: l.vector(&format!("{prefix}.weight"), d)?,
            eps,
        })
    }

    /// Normalises the last dimension of `[.., d]`.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dtype = x.dtype();
        let x = to_f32(x);
        let var = x.clone().square().mean_dim(D - 1);
        let y = x * var.add_scalar(self.eps).sqrt().recip();
        from_f32(y, dtype) * self.weight.clone().unsqueeze::<D>()
    }
}

/// LayerNorm with bias over the last dimension.
pub struct LayerNorm {
    /// `[d]`
    pub weight: Tensor<1>,
    /// `[d]`
    pub bias: Tensor<1>,
    /// Epsilon.
    pub eps: f64,
}

impl LayerNorm {
    /// Loads `{prefix}.weight` and `{prefix}.bias`.
    pub fn load(l: &Loader, prefix: &str, d: usize, eps: f64) -> Result<Self, WeightsError> {
        Ok(LayerNorm {
            weight: l.vector(&format!("{prefix}.weight"), d)?,
            bias: l.vector(&format!("{prefix}.bias"), d)?,
            eps,
        })
    }

    /// Normalises the last dimension of `[.., d]`.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dtype = x.dtype();
        let x = to_f32(x);
        let mean = x.clone().mean_dim(D - 1);
        let centered = x - mean;
        let var = centered.clone().square().mean_dim(D - 1);
        let y = centered * var.add_scalar(self.eps).sqrt().recip();
        from_f32(y, dtype) * self.weight.clone().unsqueeze::<D>()
            + self.bias.clone().unsqueeze::<D>()
    }
}

/// Either norm, for code shared between families.
// A few instances per model: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Norm {
    /// Qwen2.5-VL vision.
    Rms(RmsNorm),
    /// Qwen2-VL and Qwen3-VL vision.
    Layer(LayerNorm),
}

impl Norm {
    /// Normalises the last dimension.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        match self {
            Norm::Rms(n) => n.forward(x),
            Norm::Layer(n) => n.forward(x),
        }
    }
}

fn to_f32<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if x.dtype() == DType::F32 {
        x
    } else {
        x.cast(DType::F32)
    }
}

fn from_f32<const D: usize>(x: Tensor<D>, dtype: DType) -> Tensor<D> {
    if dtype == DType::F32 {
        x
    } else {
        x.cast(dtype)
    }
}

/// Rotary embedding, rotate-half style: `x * cos + rotate_half(x) * sin` with `cos = [c, c]`.
///
/// `x`: `[heads, seq, d]`; `cos`, `sin`: `[seq, d / 2]` (the half that is not repeated).
pub fn apply_rotary(x: Tensor<3>, cos: &Tensor<2>, sin: &Tensor<2>) -> Tensor<3> {
    let [h, s, d] = x.dims();
    let half = d / 2;
    let dtype = x.dtype();
    let x = to_f32(x);
    let x1 = x.clone().slice([0..h, 0..s, 0..half]);
    let x2 = x.slice([0..h, 0..s, half..d]);
    let c = cos.clone().unsqueeze::<3>(); // [1, seq, d/2]
    let sn = sin.clone().unsqueeze::<3>();
    let lo = x1.clone() * c.clone() - x2.clone() * sn.clone();
    let hi = x2 * c + x1 * sn;
    from_f32(Tensor::cat(vec![lo, hi], 2), dtype)
}

/// Exact (erf) GELU.
pub fn gelu(x: Tensor<2>) -> Tensor<2> {
    activation::gelu(x)
}

/// GELU with the tanh approximation (`gelu_pytorch_tanh`).
pub fn gelu_tanh(x: Tensor<2>) -> Tensor<2> {
    // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    let inner = (x.clone() + x.clone().powi_scalar(3).mul_scalar(0.044715))
        .mul_scalar((2.0 / std::f64::consts::PI).sqrt());
    x.mul_scalar(0.5) * inner.tanh().add_scalar(1.0)
}

/// `x * sigmoid(1.702 x)` (Qwen2-VL vision MLP).
pub fn quick_gelu(x: Tensor<2>) -> Tensor<2> {
    x.clone() * activation::sigmoid(x.mul_scalar(1.702))
}

/// SiLU.
pub fn silu(x: Tensor<2>) -> Tensor<2> {
    activation::silu(x)
}
