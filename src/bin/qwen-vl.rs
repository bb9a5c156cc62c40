//! `qwen-vl`: command-line front end. `--json` prints exactly one JSON object on stdout; logs,
//! progress bars and errors go to stderr.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::tensor::DType;
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use qwen_vl::generate::{GenerateOptions, Request, Sampling};
use qwen_vl::{Backend, LoadOptions, Progress, Runtime};

/// The small random-weight Qwen2-VL checkpoint bundled with the repository.
const BUNDLED_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/qwen2_vl_hub");

#[derive(Parser)]
#[command(
    name = "qwen-vl",
    version,
    about = "Qwen-VL inference on wgpu (Vulkan/Metal/DX12) or the CPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Answer a prompt about zero or more images, streaming the reply.
    Generate(GenerateArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum DeviceArg {
    Wgpu,
    Cpu,
}

#[derive(Clone, Copy, ValueEnum)]
enum DtypeArg {
    F32,
    F16,
}

#[derive(Args)]
struct ModelArgs {
    /// Checkpoint folder (Hugging Face layout). Default: the bundled tiny random-weight model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Backend.
    #[arg(long, value_enum, default_value = "wgpu")]
    device: DeviceArg,
    /// Weight and activation dtype.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DtypeArg,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Image file (png, jpeg, webp, gif); repeat for several images.
    #[arg(long = "image")]
    images: Vec<PathBuf>,
    /// The user's text.
    #[arg(long)]
    prompt: String,
    /// System prompt (default: the family's own).
    #[arg(long)]
    system: Option<String>,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 means greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Keep only the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Do not stop at end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// KV-cache positions (default: the model's limit).
    #[arg(long)]
    max_context: Option<usize>,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Write the last prompt position's logits to this safetensors file (`prefill_logits`, f32 [vocab]).
    #[arg(long)]
    dump_logits: Option<PathBuf>,
}

fn main() {
    // Library code returns errors; a panic is a bug, but it still ends in one clear line.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        eprintln!("error: internal failure: {msg} (please report this)");
    }));
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate(args),
    };
    if let Err(e) = result {
        // Library errors carry their cause in their message already; print just that one line.
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn model_dir(arg: &Option<PathBuf>) -> Result<PathBuf> {
    match arg {
        Some(p) => Ok(p.clone()),
        None => {
            let p = PathBuf::from(BUNDLED_MODEL);
            if !p.join("config.json").exists() {
                bail!(
                    "no --model given and the bundled model is missing at {}; pass --model DIR",
                    p.display()
                );
            }
            Ok(p)
        }
    }
}

fn load(args: &ModelArgs) -> Result<(Runtime, f64)> {
    let dir = model_dir(&args.model)?;
    let options = LoadOptions {
        backend: match args.device {
            DeviceArg::Wgpu => Backend::Wgpu,
            DeviceArg::Cpu => Backend::Cpu,
        },
        dtype: match args.dtype {
            DtypeArg::F32 => DType::F32,
            DtypeArg::F16 => DType::F16,
        },
    };
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} loading {msg:24} [{bar:30}] {pos}/{len} ({elapsed})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let t = Instant::now();
    let rt = Runtime::load(&dir, &options, &mut |p: Progress| {
        bar.set_length(p.total as u64);
        bar.set_position(p.done as u64);
        bar.set_message(p.item);
    });
    bar.finish_and_clear();
    let rt = rt?;
    Ok((rt, t.elapsed().as_secs_f64() * 1000.0))
}

fn generate(args: GenerateArgs) -> Result<()> {
    let (rt, load_ms) = load(&args.model)?;
    let mut request = Request::user(args.prompt.clone());
    request.system = args.system.clone();
    for path in &args.images {
        request.images.push(qwen_vl::image::load_image(path)?);
    }
    let options = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        sampling: Sampling {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
        },
        ignore_eos: args.ignore_eos,
        max_context: args.max_context,
        keep_prefill_logits: args.dump_logits.is_some(),
    };
    if !(0.0..=1.0).contains(&args.top_p) || args.top_p == 0.0 {
        bail!("--top-p must be in (0, 1], got {}", args.top_p);
    }
    if args.temperature < 0.0 || !args.temperature.is_finite() {
        bail!("--temperature must be >= 0, got {}", args.temperature);
    }
    let json = args.json;
    let mut stdout = std::io::stdout();
    let out = rt.generate(&request, &options, &mut |piece| {
        if !json {
            let _ = write!(stdout, "{piece}");
            let _ = stdout.flush();
        }
    })?;
    if let (Some(path), Some(logits)) = (&args.dump_logits, &out.prefill_logits) {
        write_logits(path, logits)?;
    }
    if json {
        let report = serde_json::json!({
            "family": rt.family(),
            "prompt_tokens": out.prompt_tokens,
            "token_ids": out.token_ids,
            "text": out.text,
            "finish_reason": out.finish_reason,
            "timings_ms": {
                "load": load_ms,
                "vision": out.timings.vision,
                "prefill": out.timings.prefill,
                "decode": out.timings.decode,
            },
            "adapter": rt.model.device.adapter,
        });
        println!("{report}");
    } else {
        println!();
        let n = out.token_ids.len();
        eprintln!(
            "[{} prompt tokens, {n} generated, prefill {:.0} ms, decode {:.1} tok/s, {:?}]",
            out.prompt_tokens,
            out.timings.prefill,
            if out.timings.decode > 0.0 {
                (n.saturating_sub(1)) as f64 / (out.timings.decode / 1000.0)
            } else {
                0.0
            },
            out.finish_reason
        );
    }
    Ok(())
}

fn write_logits(path: &Path, logits: &[f32]) -> Result<()> {
    let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![logits.len()], &bytes)
            .context("building the logits tensor")?;
    safetensors::serialize_to_file([("prefill_logits", view)], None, path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
