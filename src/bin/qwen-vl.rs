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

/// The default model: the micro Qwen2-VL bundled with the repository, trained on generated
/// shape scenes (`qwen-vl synth`; see tools/micro/train.py).
const BUNDLED_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/micro-qwen2-vl");

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
    /// The multi-phase visual-reasoning pipeline: steps, grounding, evidence, answer.
    Pipeline(PipelineArgs),
    /// Multi-turn chat on stdin/stdout (/image PATH switches image, /reset, /quit).
    Chat(ChatArgs),
    /// Measure performance (see the README's tables).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Every adapter wgpu can see on every graphics API, with its limits and features.
    Devices(DevicesArgs),
    /// Check kernels and HF parity on each adapter; exits non-zero if any adapter fails.
    Selftest(SelftestArgs),
    /// Write synthetic shape scenes with their questions and answers (the micro model's
    /// training data; tools/micro/train.py reads it).
    Synth(SynthArgs),
    /// Accuracy of a model on generated shape scenes: per question kind, grounding IoU and the
    /// pipeline's answers (see src/eval.rs).
    Eval(EvalArgs),
    /// Write a quantized copy of a checkpoint folder (q8 or q4 matrices; see the README's
    /// "Quantized checkpoints"), which every command and the web page load directly.
    Quantize(QuantizeArgs),
}

#[derive(Args)]
struct QuantizeArgs {
    /// Checkpoint folder to quantize (Hugging Face layout, bf16/f16/f32 weights).
    #[arg(long)]
    model: PathBuf,
    /// Output folder (created; must not hold a checkpoint).
    #[arg(long)]
    out: PathBuf,
    /// Scheme.
    #[arg(long, value_enum)]
    quant: QuantArg,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Scenes to generate and ask about (scenes 0..N of --seed).
    #[arg(long, value_name = "N", required_unless_present = "score_items")]
    synthetic: Option<usize>,
    /// Scene seed; use one the model was not trained on.
    #[arg(long, required_unless_present = "score_items")]
    seed: Option<u64>,
    /// Tokens each direct answer may take.
    #[arg(long, default_value_t = 48)]
    max_new_tokens: usize,
    /// Compute every question from scratch (no shared image encoding or KV prefix).
    #[arg(long)]
    no_cache: bool,
    /// Write every item (prompt, expected answer, output, token ids, scene PNG in a folder
    /// FILE_STEM_scenes next to it) to this JSON file, for tools/micro/eval_hf.py and for
    /// comparing runs.
    #[arg(long, value_name = "FILE")]
    items: Option<PathBuf>,
    /// Score the outputs in an items file (written by --items, or by tools/micro/eval_hf.py)
    /// instead of running a model.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["synthetic", "items"])]
    score_items: Option<PathBuf>,
    /// Also list every item (in the JSON report: an `items` array).
    #[arg(long)]
    verbose: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct SynthArgs {
    /// Scenes to generate.
    #[arg(long, default_value_t = 1000)]
    n: u64,
    /// Seed; scene i of seed s is the same everywhere.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output folder (created): scenes/, crops/, data.jsonl (one supervised turn per line:
    /// image, prompt, answer, task) and scenes.jsonl (one scene per line: image, size and every
    /// shape's kind, colour, size class and box in pixels).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct DevicesArgs {
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct SelftestArgs {
    /// Adapter index from `qwen-vl devices`, or `all`.
    #[arg(long, default_value = "all")]
    adapter: String,
    /// Fixture folder with golden_*.json/.safetensors (repeatable). Default: the bundled qwen2_vl_hub.
    #[arg(long = "fixture")]
    fixtures: Vec<PathBuf>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct PipelineTuning {
    /// Reasoning steps at most.
    #[arg(long, default_value_t = 4)]
    max_steps: usize,
    /// Regions grounded and captioned at most.
    #[arg(long, default_value_t = 4)]
    max_regions: usize,
    /// Visual tokens the image gets at least in phases 1, 2 and 4 (real models ground better with
    /// >= 1024), never above the checkpoint's max_pixels.
    #[arg(long, default_value_t = 1024)]
    main_tokens: usize,
    /// Visual tokens each crop gets at most in phase 3.
    #[arg(long, default_value_t = 384)]
    crop_tokens: usize,
    /// Token budget of phase 1.
    #[arg(long, default_value_t = 256)]
    steps_tokens: usize,
    /// Token budget of each grounding answer.
    #[arg(long, default_value_t = 64)]
    box_tokens: usize,
    /// Token budget of each caption.
    #[arg(long, default_value_t = 64)]
    caption_tokens: usize,
    /// Token budget of the answer.
    #[arg(long, default_value_t = 160)]
    answer_tokens: usize,
    /// Vision-embedding cache budget in MiB.
    #[arg(long, default_value_t = 256)]
    vision_cache_mb: usize,
}

impl PipelineTuning {
    fn options(&self) -> qwen_vl::pipeline::PipelineOptions {
        qwen_vl::pipeline::PipelineOptions {
            max_steps: self.max_steps,
            max_regions: self.max_regions,
            main_min_tokens: self.main_tokens,
            crop_max_tokens: self.crop_tokens.max(1),
            steps_tokens: self.steps_tokens,
            box_tokens: self.box_tokens,
            caption_tokens: self.caption_tokens,
            answer_tokens: self.answer_tokens,
            vision_cache_bytes: self.vision_cache_mb << 20,
            ..Default::default()
        }
    }
}

#[derive(Args)]
struct PipelineArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The image.
    #[arg(long)]
    image: PathBuf,
    /// The question.
    #[arg(long)]
    question: String,
    #[command(flatten)]
    tuning: PipelineTuning,
    /// Turn the vision cache and prefix KV reuse off.
    #[arg(long)]
    no_cache: bool,
    /// Draw the boxes and step numbers on the image and save it here (PNG).
    #[arg(long)]
    annotate: Option<PathBuf>,
    /// Print the JSON report only.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Start with this image.
    #[arg(long)]
    image: Option<PathBuf>,
    /// System prompt (default: the family's own).
    #[arg(long)]
    system: Option<String>,
    /// Tokens per reply at most.
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 means greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// KV-cache positions (default: what fits 1 GiB).
    #[arg(long)]
    max_context: Option<usize>,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Decode attention and whole-model decode cost at several contexts.
    Decode(BenchDecodeArgs),
    /// The 4-phase pipeline with all caches vs none, same work, one run.
    Pipeline(BenchPipelineArgs),
    /// One decode-time matrix product per weight representation (f32, f16, q8, q4).
    Matvec(BenchMatvecArgs),
}

#[derive(Args)]
struct BenchMatvecArgs {
    /// Shapes OUTxIN (default: Qwen2-VL-2B's decoder matrices and an lm_head chunk).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1536x1536,256x1536,8960x1536,1536x8960,21845x1536"
    )]
    shapes: Vec<String>,
    /// Timed calls per row.
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Backend.
    #[arg(long, value_enum, default_value = "wgpu")]
    device: DeviceArg,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchPipelineArgs {
    /// Checkpoint folder to measure.
    #[arg(long, conflicts_with = "preset")]
    model: Option<PathBuf>,
    /// A real model shape with random weights: qwen2-vl-2b, qwen2.5-vl-3b, qwen3-vl-2b.
    #[arg(long)]
    preset: Option<String>,
    /// Cut the decoder to this many layers.
    #[arg(long)]
    layers: Option<usize>,
    /// Cut the vision tower to this many blocks.
    #[arg(long)]
    vision_layers: Option<usize>,
    /// Skip the untimed warm-up run (it compiles the kernels first, so neither timed run pays
    /// for that).
    #[arg(long)]
    no_warmup: bool,
    /// Steps (each grounded and captioned).
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Image size WxH of the generated test image.
    #[arg(long, default_value = "896x672")]
    image_size: String,
    #[command(flatten)]
    tuning: PipelineTuning,
    /// Backend.
    #[arg(long, value_enum, default_value = "wgpu")]
    device: DeviceArg,
    /// Quantize the matrices while loading.
    #[arg(long, value_enum)]
    quant: Option<QuantArg>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchDecodeArgs {
    /// Checkpoint folder to measure.
    #[arg(long, conflicts_with = "preset")]
    model: Option<PathBuf>,
    /// A real model shape with random weights: qwen2-vl-2b, qwen2.5-vl-3b, qwen3-vl-2b.
    #[arg(long)]
    preset: Option<String>,
    /// Cut the decoder to this many layers (keeps runs short; attention rows are per layer anyway).
    #[arg(long)]
    layers: Option<usize>,
    /// Contexts to measure at.
    #[arg(long, value_delimiter = ',', default_value = "128,512,2048,4096")]
    contexts: Vec<usize>,
    /// Timed calls per attention measurement.
    #[arg(long, default_value_t = 50)]
    iters: usize,
    /// Timed tokens per whole-model measurement.
    #[arg(long, default_value_t = 8)]
    tokens: usize,
    /// Skip the no-cache recompute row above this context.
    #[arg(long, default_value_t = 4096)]
    recompute_max: usize,
    /// Prompt length for the prefill throughput figure.
    #[arg(long, default_value_t = 512)]
    prefill_tokens: usize,
    /// Backend.
    #[arg(long, value_enum, default_value = "wgpu")]
    device: DeviceArg,
    /// Weight and activation dtype.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DtypeArg,
    /// Quantize the matrices while loading.
    #[arg(long, value_enum)]
    quant: Option<QuantArg>,
    /// Skip the whole-model rows of Burn's own path (slow with --quant: it dequantizes every
    /// matrix through plain Burn ops per token).
    #[arg(long)]
    no_burn: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
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

#[derive(Clone, Copy, ValueEnum)]
enum QuantArg {
    /// 8-bit integers, one f16 scale per 32 inputs.
    Q8,
    /// 4-bit integers, one f16 scale per 32 inputs.
    Q4,
}

fn quant(arg: Option<QuantArg>) -> Option<qwen_vl::quant::Scheme> {
    arg.map(|q| match q {
        QuantArg::Q8 => qwen_vl::quant::Scheme::Q8,
        QuantArg::Q4 => qwen_vl::quant::Scheme::Q4,
    })
}

#[derive(Args)]
struct ModelArgs {
    /// Checkpoint folder (Hugging Face layout). Default: the bundled micro model (models/micro-qwen2-vl).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Backend.
    #[arg(long, value_enum, default_value = "wgpu")]
    device: DeviceArg,
    /// Weight and activation dtype.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DtypeArg,
    /// Quantize the matrices while loading (a quantized checkpoint loads as it is stored).
    #[arg(long, value_enum)]
    quant: Option<QuantArg>,
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
    /// KV-cache positions (default: the model's limit, or what fits --kv-budget-mb).
    #[arg(long)]
    max_context: Option<usize>,
    /// Device memory for the KV cache when --max-context is not given, in MiB.
    #[arg(long, default_value_t = 1024)]
    kv_budget_mb: usize,
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
        Command::Pipeline(args) => pipeline(args),
        Command::Chat(args) => chat(args),
        Command::Bench(BenchCommand::Decode(args)) => bench_decode(args),
        Command::Bench(BenchCommand::Pipeline(args)) => bench_pipeline(args),
        Command::Bench(BenchCommand::Matvec(args)) => bench_matvec(args),
        Command::Devices(args) => devices(args),
        Command::Selftest(args) => selftest(args),
        Command::Synth(args) => synth(args),
        Command::Eval(args) => eval(args),
        Command::Quantize(args) => quantize(args),
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
        quant: quant(args.quant),
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
        kv_budget_bytes: args.kv_budget_mb << 20,
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
        println!("{}", out.report(&rt, load_ms));
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

fn pipeline(args: PipelineArgs) -> Result<()> {
    let (rt, load_ms) = load(&args.model)?;
    let image = qwen_vl::image::load_image(&args.image)?;
    let mut options = args.tuning.options();
    options.caches = !args.no_cache;
    let mut pipe = qwen_vl::pipeline::Pipeline::new(&rt, options)?;
    let json = args.json;
    let mut current = String::new();
    let report = pipe.run(&image, &args.question, &mut |phase, piece| {
        if !json {
            if current != phase {
                eprint!("\n[{phase}] ");
                current = phase.to_string();
            }
            eprint!("{piece}");
        }
    })?;
    if let Some(path) = &args.annotate {
        let boxes: Vec<(usize, [f32; 4])> = report
            .steps
            .iter()
            .filter_map(|s| s.bbox.map(|b| (s.index, b)))
            .collect();
        qwen_vl::pipeline::annotate::annotate(&image, &boxes)
            .save(path)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if json {
        let mut v = serde_json::to_value(&report)?;
        v["timings_ms"] = serde_json::json!({"load": load_ms, "total": report.total_ms});
        println!("{v}");
        return Ok(());
    }
    eprintln!();
    println!("Question: {}", report.question);
    for s in &report.steps {
        let bbox = s
            .bbox
            .map(|b| format!(" box [{:.0}, {:.0}, {:.0}, {:.0}]", b[0], b[1], b[2], b[3]))
            .unwrap_or_default();
        println!(
            "  {}. {}{}{}",
            s.index,
            s.text,
            if s.needs_vision {
                " (needs vision)"
            } else {
                ""
            },
            bbox
        );
        if let Some(e) = &s.evidence {
            println!("     seen: {e}");
        }
    }
    println!("Answer: {}", report.answer);
    println!(
        "\n{:<10} {:>9} {:>7} {:>7} {:>5} {:>5}",
        "phase", "ms", "prompt", "reused", "new", "hits"
    );
    for p in &report.phases {
        println!(
            "{:<10} {:>9.1} {:>7} {:>7} {:>5} {:>5}{}",
            p.name,
            p.ms,
            p.prompt_tokens,
            p.reused_tokens,
            p.new_tokens,
            p.vision_cache_hits,
            p.note
                .as_deref()
                .map(|n| format!("  ({n})"))
                .unwrap_or_default()
        );
    }
    let v = &report.cache.vision;
    println!(
        "total {:.1} ms; prefix KV {} prompt tokens reused, {} computed; vision cache {} hits, {} misses, {} entries ({:.1} KiB of {} MiB)",
        report.total_ms,
        report.cache.reused_tokens,
        report.cache.computed_tokens,
        v.hits,
        v.misses,
        v.entries,
        v.bytes as f64 / 1024.0,
        v.budget >> 20
    );
    Ok(())
}

fn chat(args: ChatArgs) -> Result<()> {
    use qwen_vl::session::{Session, SessionOptions};
    use qwen_vl::tokenizer::{ChatMessage, Content};
    use std::io::BufRead;
    let (rt, _) = load(&args.model)?;
    let mut session = Session::new(
        &rt,
        SessionOptions {
            max_context: args.max_context,
            ..Default::default()
        },
    )?;
    let mut image = match &args.image {
        Some(p) => Some(qwen_vl::image::load_image(p)?),
        None => None,
    };
    let mut history: Vec<ChatMessage> = Vec::new();
    let options = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        sampling: Sampling {
            temperature: args.temperature,
            seed: args.seed,
            ..Default::default()
        },
        ..Default::default()
    };
    eprintln!(
        "chat with {} ({} positions); /image PATH, /reset, /quit",
        rt.family(),
        session.capacity()
    );
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    for line in stdin.lock().lines() {
        let line = line?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line == "/quit" || line == "/exit" {
            break;
        }
        if line == "/reset" {
            history.clear();
            session.reset();
            eprintln!("[conversation cleared]");
            continue;
        }
        if let Some(path) = line.strip_prefix("/image") {
            // A new image starts a new conversation about it; nothing of the old one is reused
            // (its image tokens carry the old image's hash, so the KV prefix stops there).
            match qwen_vl::image::load_image(Path::new(path.trim())) {
                Ok(img) => {
                    image = Some(img);
                    history.clear();
                    eprintln!("[new conversation with {}]", path.trim());
                }
                Err(e) => eprintln!("error: {e}"),
            }
            continue;
        }
        let mut content = Vec::new();
        if history.is_empty() && image.is_some() {
            content.push(Content::Image);
        }
        content.push(Content::Text(line.to_string()));
        history.push(ChatMessage {
            role: "user".into(),
            content,
        });
        // Context policy: drop the oldest exchanges (keeping the image with the first turn) until
        // the prompt and the reply fit; if the new message alone does not fit, say so.
        let images: Vec<_> = image.iter().cloned().collect();
        loop {
            let mut messages = Vec::new();
            if let Some(s) = &args.system {
                messages.push(ChatMessage {
                    role: "system".into(),
                    content: vec![Content::Text(s.clone())],
                });
            }
            messages.extend(history.iter().cloned());
            let result =
                session.generate(&messages, &images, &rt.preprocess, &options, &mut |piece| {
                    let _ = write!(stdout, "{piece}");
                    let _ = stdout.flush();
                });
            match result {
                Ok((out, stats)) => {
                    println!();
                    eprintln!(
                        "[{} prompt tokens, {} reused, {} generated]",
                        stats.prompt_tokens, stats.reused_tokens, stats.generated_tokens
                    );
                    history.push(ChatMessage {
                        role: "assistant".into(),
                        content: vec![Content::Text(out.text)],
                    });
                    break;
                }
                Err(qwen_vl::Error::BadInput(msg))
                    if msg.contains("context holds") && history.len() > 1 =>
                {
                    // Drop the oldest user/assistant pair; move the image to the new first turn.
                    let dropped = history
                        .drain(..2.min(history.len() - 1))
                        .collect::<Vec<_>>();
                    if dropped
                        .iter()
                        .any(|m| m.content.iter().any(|c| matches!(c, Content::Image)))
                    {
                        if let Some(first) = history.first_mut() {
                            first.content.insert(0, Content::Image);
                        }
                    }
                    eprintln!("[dropped the oldest exchange to fit the context]");
                }
                Err(e) => {
                    history.pop();
                    eprintln!("error: {e}");
                    break;
                }
            }
        }
    }
    Ok(())
}

fn bench_pipeline(args: BenchPipelineArgs) -> Result<()> {
    use qwen_vl::pipeline::{FixedPlan, Pipeline};
    let (w, h) = args
        .image_size
        .split_once('x')
        .and_then(|(w, h)| Some((w.parse::<u32>().ok()?, h.parse::<u32>().ok()?)))
        .filter(|(w, h)| *w > 0 && *h > 0)
        .with_context(|| {
            format!(
                "--image-size must look like 896x672, got {}",
                args.image_size
            )
        })?;
    let rt = match (&args.preset, &args.model) {
        (Some(name), _) => {
            let config = qwen_vl::bench::preset_config(name, args.layers, args.vision_layers)?;
            // Tokenizer and preprocessing of the family come from the bundled fixtures.
            let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join(match config.family {
                qwen_vl::Family::Qwen3Vl => "tests/fixtures/qwen3_vl",
                _ => "tests/fixtures/qwen2_vl_hub",
            });
            let tokenizer = qwen_vl::tokenizer::QwenTokenizer::from_dir(&fixture)?;
            let mut preprocess = qwen_vl::image::PreprocessConfig::from_file(
                &fixture.join("preprocessor_config.json"),
            )?;
            preprocess.max_pixels = 16384 * 28 * 28;
            let device = device_handle(args.device)?;
            eprintln!(
                "building {name} ({} layers, vision {} blocks) with random weights on {} ...",
                config.text.num_layers, config.vision.depth, device.adapter.name
            );
            let model = qwen_vl::load_model(
                &qwen_vl::weights::Checkpoint::synthetic(7),
                config,
                device,
                DType::F32,
                quant(args.quant),
                &mut |_| {},
            )?;
            let id = qwen_vl::model_identity(name, "preset", DType::F32, model.quant);
            Runtime::from_parts(model, tokenizer, preprocess, PathBuf::from(name), id)
        }
        (None, Some(dir)) => {
            load(&ModelArgs {
                model: Some(dir.clone()),
                device: args.device,
                dtype: DtypeArg::F32,
                quant: args.quant,
            })?
            .0
        }
        (None, None) => bail!("give --model DIR or --preset NAME"),
    };
    // A deterministic test image: a gradient with a few coloured blocks.
    let image = image::RgbImage::from_fn(w, h, |x, y| {
        let block = ((x * 4 / w) + (y * 3 / h)) % 3;
        let base = [(x * 255 / w) as u8, (y * 255 / h) as u8, 128];
        let mut p = base;
        p[block as usize] = 255 - p[block as usize] / 2;
        image::Rgb(p)
    });
    let question = "What objects are in the image and where are they?";
    if !args.no_warmup {
        // A throwaway pipeline (its caches go with it): the kernels are compiled here, not in
        // whichever timed run comes first.
        let mut options = args.tuning.options();
        options.plan = Some(FixedPlan { steps: args.steps });
        eprintln!("warm-up run (untimed) ...");
        Pipeline::new(&rt, options)?.run(&image, question, &mut |_, _| {})?;
    }
    let mut results = Vec::new();
    for caches in [true, false] {
        let mut options = args.tuning.options();
        options.caches = caches;
        options.plan = Some(FixedPlan { steps: args.steps });
        let mut pipe = Pipeline::new(&rt, options)?;
        eprintln!(
            "running the pipeline with caches {} ...",
            if caches { "on" } else { "off" }
        );
        results.push(pipe.run(&image, question, &mut |_, _| {})?);
    }
    let (on, off) = (&results[0], &results[1]);
    let ratio = off.total_ms / on.total_ms;
    if args.json {
        let phases: Vec<serde_json::Value> = on
            .phases
            .iter()
            .zip(&off.phases)
            .map(|(a, b)| serde_json::json!({"name": a.name, "cached_ms": a.ms, "uncached_ms": b.ms, "cached": a, "uncached": b}))
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "adapter": rt.model.device.adapter,
                "model": {"family": rt.family(), "layers": rt.model.config.text.num_layers, "vision_layers": rt.model.config.vision.depth, "hidden_size": rt.model.config.text.hidden_size},
                "steps": args.steps,
                "image_size": [w, h],
                "cached_ms": on.total_ms,
                "uncached_ms": off.total_ms,
                "speedup": ratio,
                "phases": phases,
                "cache": on.cache,
            })
        );
        return Ok(());
    }
    println!("adapter: {}", rt.model.device.adapter.name);
    println!(
        "{:<10} {:>12} {:>12} {:>8} {:>8}",
        "phase", "cached ms", "no-cache ms", "reused", "hits"
    );
    for (a, b) in on.phases.iter().zip(&off.phases) {
        println!(
            "{:<10} {:>12.1} {:>12.1} {:>8} {:>8}",
            a.name, a.ms, b.ms, a.reused_tokens, a.vision_cache_hits
        );
    }
    println!(
        "total      {:>12.1} {:>12.1}   speedup {ratio:.2}x",
        on.total_ms, off.total_ms
    );
    Ok(())
}

fn device_handle(arg: DeviceArg) -> Result<qwen_vl::DeviceHandle> {
    Ok(match arg {
        DeviceArg::Wgpu => qwen_vl::DeviceHandle::wgpu()?,
        DeviceArg::Cpu => qwen_vl::DeviceHandle::cpu(),
    })
}

fn dtype(arg: DtypeArg) -> DType {
    match arg {
        DtypeArg::F32 => DType::F32,
        DtypeArg::F16 => DType::F16,
    }
}

fn bench_decode(args: BenchDecodeArgs) -> Result<()> {
    use qwen_vl::bench::{preset_config, run_decode, DecodeBench};
    use qwen_vl::weights::Checkpoint;
    if args.contexts.is_empty() || args.contexts.contains(&0) {
        bail!("--contexts must list positive context lengths");
    }
    let (config, ckpt) = match (&args.preset, &args.model) {
        (Some(name), _) => (
            preset_config(name, args.layers, Some(1))?,
            Checkpoint::synthetic(7),
        ),
        (None, Some(dir)) => {
            let mut config = qwen_vl::ModelConfig::from_dir(dir)?;
            if let Some(k) = args.layers {
                config.text.num_layers = k.min(config.text.num_layers);
                config
                    .vision
                    .deepstack_visual_indexes
                    .truncate(config.text.num_layers);
            }
            (config, Checkpoint::open_dir(dir)?)
        }
        (None, None) => bail!("give --model DIR or --preset NAME"),
    };
    let device = device_handle(args.device)?;
    eprintln!(
        "loading {} layers on {} ...",
        config.text.num_layers, device.adapter.name
    );
    let model = qwen_vl::load_model(
        &ckpt,
        config,
        device,
        dtype(args.dtype),
        quant(args.quant),
        &mut |_| {},
    )?;
    let bench = DecodeBench {
        contexts: args.contexts.clone(),
        attention_iters: args.iters.max(1),
        tokens: args.tokens.max(1),
        recompute_max: args.recompute_max,
        prefill_tokens: args.prefill_tokens.max(1),
        burn: !args.no_burn,
    };
    let report = run_decode(&model, &bench, &mut |what| eprintln!("  measuring {what}"))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!(
        "adapter: {} ({})",
        report.adapter.name, report.adapter.backend
    );
    println!("model: {}", report.model);
    println!("\ndecode attention, one layer (append + attend), us per call:");
    println!(
        "{:>8} {:>10} {:>10} {:>8}",
        "context", "wgsl", "burn", "speedup"
    );
    for &n in &args.contexts {
        let get = |p: &str| {
            report
                .attention
                .iter()
                .find(|r| r.context == n && r.path == p)
                .map(|r| r.us)
        };
        let (w, b) = (get("wgsl"), get("burn"));
        let speedup = match (w, b) {
            (Some(w), Some(b)) => format!("{:.2}x", b / w),
            _ => "-".into(),
        };
        let fmt = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into());
        println!("{n:>8} {:>10} {:>10} {speedup:>8}", fmt(w), fmt(b));
    }
    println!("\nwhole model, ms per generated token:");
    println!(
        "{:>8} {:>10} {:>10} {:>10}",
        "context", "wgsl", "burn", "recompute"
    );
    for &n in &args.contexts {
        let get = |p: &str| {
            report
                .rows
                .iter()
                .find(|r| r.context == n && r.path == p)
                .map(|r| format!("{:.2}", r.ms_per_token))
                .unwrap_or_else(|| "-".into())
        };
        println!(
            "{n:>8} {:>10} {:>10} {:>10}",
            get("wgsl"),
            get("burn"),
            get("recompute")
        );
    }
    println!(
        "\nprefill: {:.1} tokens/s ({} tokens)",
        report.prefill_tokens_per_s, report.prefill_tokens
    );
    Ok(())
}

fn bench_matvec(args: BenchMatvecArgs) -> Result<()> {
    let shapes = args
        .shapes
        .iter()
        .map(|s| {
            s.split_once('x')
                .and_then(|(o, i)| Some([o.parse::<usize>().ok()?, i.parse::<usize>().ok()?]))
                .filter(|[o, i]| *o > 0 && *i > 0 && o.saturating_mul(*i) <= 1 << 28)
                .with_context(|| {
                    format!("--shapes: expected OUTxIN with at most 2^28 elements, got {s}")
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let device = device_handle(args.device)?;
    let rows = qwen_vl::bench::run_matvec(&device, &shapes, args.iters, &mut |w| {
        eprintln!("  measuring {w}")
    })?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({"adapter": device.adapter, "rows": rows})
        );
        return Ok(());
    }
    println!("adapter: {}", device.adapter.name);
    println!(
        "{:>12} {:>6} {:>10} {:>8} {:>9}",
        "shape", "store", "us", "GB/s", "vs f32"
    );
    for r in &rows {
        let f32_us = rows
            .iter()
            .find(|b| b.shape == r.shape && b.storage == "f32")
            .map_or(f64::NAN, |b| b.us);
        println!(
            "{:>12} {:>6} {:>10.1} {:>8.2} {:>8.2}x",
            format!("{}x{}", r.shape[0], r.shape[1]),
            r.storage,
            r.us,
            r.gb_per_s,
            f32_us / r.us
        );
    }
    Ok(())
}

fn quantize(args: QuantizeArgs) -> Result<()> {
    let scheme = quant(Some(args.quant)).context("a scheme")?;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} quantizing {msg:40} [{bar:30}] {pos}/{len} ({elapsed})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let t = Instant::now();
    let report = qwen_vl::quantize::quantize_dir(&args.model, &args.out, scheme, &mut |p| {
        bar.set_length(p.total as u64);
        bar.set_position(p.done as u64);
        bar.set_message(p.item);
    });
    bar.finish_and_clear();
    let report = report?;
    let secs = t.elapsed().as_secs_f64();
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        v["seconds"] = secs.into();
        println!("{v}");
        return Ok(());
    }
    println!(
        "wrote {} ({}): {} matrices quantized, {} tensors copied, {:.1} MiB -> {:.1} MiB of tensors in {:.1} s; files: {}",
        args.out.display(),
        scheme,
        report.quantized,
        report.copied,
        report.bytes_in as f64 / (1u64 << 20) as f64,
        report.bytes_out as f64 / (1u64 << 20) as f64,
        secs,
        report
            .shards
            .iter()
            .chain(&report.copied_files)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    );
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

fn devices(args: DevicesArgs) -> Result<()> {
    let adapters = qwen_vl::device::enumerate_adapters();
    if args.json {
        println!("{}", serde_json::json!({ "adapters": adapters }));
        return Ok(());
    }
    if adapters.is_empty() {
        println!("no wgpu adapter found (on Linux without a GPU: install mesa-vulkan-drivers for lavapipe)");
        return Ok(());
    }
    let mib = |b: u64| format!("{} MiB", b >> 20);
    let yes = |b: bool| if b { "yes" } else { "no" };
    println!(
        "{:>2}  {:<34} {:<6} {:<10} {:>7} {:>6} {:>10} {:>11} {:>9} {:>11} {:>14} {:>4} {:>9} {:>10}",
        "#", "name", "api", "type", "vendor", "device", "max buffer", "max binding", "wg memory",
        "invocations", "wg size x/y/z", "f16", "subgroups", "timestamps"
    );
    for a in &adapters {
        let (l, f) = (&a.limits, &a.features);
        let [x, y, z] = l.max_compute_workgroup_size;
        println!(
            "{:>2}  {:<34} {:<6} {:<10} {:>7} {:>6} {:>10} {:>11} {:>9} {:>11} {:>14} {:>4} {:>9} {:>10}",
            a.index,
            a.name,
            a.backend,
            a.device_type,
            format!("{:#06x}", a.vendor_id),
            format!("{:#06x}", a.device_id),
            mib(l.max_buffer_size),
            mib(l.max_storage_buffer_binding_size),
            format!("{} KiB", l.max_compute_workgroup_storage_size >> 10),
            l.max_compute_invocations_per_workgroup,
            format!("{x}/{y}/{z}"),
            yes(f.shader_f16),
            if f.subgroups {
                format!("{}..{}", f.subgroup_size[0], f.subgroup_size[1])
            } else {
                "no".into()
            },
            yes(f.timestamp_query),
        );
    }
    println!();
    for a in &adapters {
        println!(
            "{:>2}  driver: {}; runtime selector: {} on {}",
            a.index,
            format!("{} {}", a.driver, a.driver_info).trim(),
            a.selector.as_deref().unwrap_or("(not addressable)"),
            a.backend
        );
    }
    Ok(())
}

fn selftest(args: SelftestArgs) -> Result<()> {
    use qwen_vl::selftest::{self as st, Selection};
    let selection = match args.adapter.as_str() {
        "all" => Selection::All,
        n => Selection::Index(n.parse().with_context(|| {
            format!("--adapter takes an index from `qwen-vl devices` or `all`, got `{n}`")
        })?),
    };
    let fixtures = if args.fixtures.is_empty() {
        vec![st::default_fixture()]
    } else {
        args.fixtures.clone()
    };
    let report = st::run(selection, &fixtures, &mut |what| {
        eprintln!("selftest: {what}")
    })?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_selftest(&report);
    }
    if !report.pass {
        bail!("selftest failed (see the rows above)");
    }
    Ok(())
}

fn print_selftest(report: &qwen_vl::selftest::SelftestReport) {
    for r in report.reference.iter().filter(|r| !r.pass) {
        println!(
            "reference FAILED: the CPU backend differs from HF on {} (logits {:.1e}, top-1 {}/{}); the fixture or the model code is broken",
            r.golden, r.logits_max_err, r.top1_agree, r.positions
        );
    }
    println!(
        "{:>2}  {:<34} {:<6} {:<5} {:>14} {:>7} {:>9} {:>7} {:>8} {:>10} {:>7}  result",
        "#",
        "adapter",
        "api",
        "type",
        "kernels",
        "err/tol",
        "logits",
        "top-1",
        "greedy",
        "decode ms",
        "time s"
    );
    for row in &report.adapters {
        let a = &row.adapter;
        let head = format!(
            "{:>2}  {:<34} {:<6} {:<5}",
            a.index, a.name, a.backend, a.device_type
        );
        let Some(c) = &row.check else {
            println!(
                "{head}  FAIL: {}",
                row.error.as_deref().unwrap_or("no result")
            );
            continue;
        };
        let agree: usize = c.goldens.iter().map(|g| g.top1_agree).sum();
        let positions: usize = c.goldens.iter().map(|g| g.positions).sum();
        let greedy = c
            .goldens
            .iter()
            .filter(|g| g.greedy_match == Some(true))
            .count();
        let k = &c.kernels;
        println!(
            "{head} {:>14} {:>7.3} {:>9.1e} {:>7} {:>8} {:>10} {:>7.0}  {}",
            format!("{}/{} ({} wgsl)", k.cases - k.failed, k.cases, k.wgsl_cases),
            k.worst_ratio,
            c.worst_logits_err,
            format!("{agree}/{positions}"),
            format!("{greedy}/{}", c.goldens.len()),
            c.timing
                .as_ref()
                .map(|t| format!("{:.1}", t.decode_ms_per_token))
                .unwrap_or_else(|| "-".into()),
            row.seconds,
            if row.pass { "PASS" } else { "FAIL" }
        );
        for note in &c.notes {
            println!("      note: {note}");
        }
        for f in &k.failures {
            println!("      kernel: {f}");
        }
        for g in c.goldens.iter().filter(|g| !g.pass) {
            println!(
                "      {}: logits {:.2e}, top-1 {}/{} (first differs at {:?}), greedy = HF {:?}{}",
                g.golden,
                g.logits_max_err,
                g.top1_agree,
                g.positions,
                g.first_disagreement,
                g.greedy_match,
                g.error
                    .as_deref()
                    .map(|e| format!(", error: {e}"))
                    .unwrap_or_default()
            );
        }
    }
    println!(
        "err/tol: worst kernel error over its tolerance (f32 attention {:.0e}, f16 {:.0e}, matvec 1e-6 x terms, kv_append exact); \
         logits: max |prefill logits - HF| (tol {:.0e}); top-1: positions whose argmax equals the CPU backend's, \
         both fed HF's greedy tokens; greedy: goldens whose free-running greedy tokens equal HF's; \
         decode ms: per token on the longest golden",
        qwen_vl::selftest::KERNEL_TOL_F32,
        qwen_vl::selftest::KERNEL_TOL_F16,
        qwen_vl::selftest::LOGIT_TOL
    );
}

fn synth(args: SynthArgs) -> Result<()> {
    use qwen_vl::synth;
    use std::io::Write;
    for sub in ["scenes", "crops"] {
        let dir = args.out.join(sub);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating {} (is --out writable?)", dir.display()))?;
    }
    let path = args.out.join("data.jsonl");
    let file =
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    let scenes_path = args.out.join("scenes.jsonl");
    let scenes_file = std::fs::File::create(&scenes_path)
        .with_context(|| format!("creating {}", scenes_path.display()))?;
    let mut scenes_out = std::io::BufWriter::new(scenes_file);
    let bar = indicatif::ProgressBar::new(args.n).with_message("scenes");
    let mut lines = 0usize;
    for i in 0..args.n {
        let scene = synth::scene(args.seed, i);
        let image = scene.render();
        let name = format!("scenes/{}_{i:06}.png", args.seed);
        image
            .save(args.out.join(&name))
            .with_context(|| format!("writing {name}"))?;
        let mut record = serde_json::to_value(&scene)?;
        record["image"] = name.clone().into();
        record["scene"] = i.into();
        writeln!(scenes_out, "{record}")
            .with_context(|| format!("writing {}", scenes_path.display()))?;
        for (k, item) in synth::training_items(&scene, &image, args.seed, i)
            .into_iter()
            .enumerate()
        {
            let image_name = match &item.crop {
                Some(c) => {
                    let crop_name = format!("crops/{}_{i:06}_{k}.png", args.seed);
                    c.save(args.out.join(&crop_name))
                        .with_context(|| format!("writing {crop_name}"))?;
                    crop_name
                }
                None => name.clone(),
            };
            let line = serde_json::json!({
                "image": image_name,
                "prompt": item.prompt,
                "answer": item.answer,
                "task": item.task,
                "scene": i,
            });
            writeln!(out, "{line}").with_context(|| format!("writing {}", path.display()))?;
            lines += 1;
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    out.flush()
        .with_context(|| format!("writing {}", path.display()))?;
    scenes_out
        .flush()
        .with_context(|| format!("writing {}", scenes_path.display()))?;
    eprintln!(
        "{} scenes, {lines} supervised turns -> {}",
        args.n,
        path.display()
    );
    Ok(())
}

fn eval(args: EvalArgs) -> Result<()> {
    use qwen_vl::eval::{self, EvalOptions, ItemsFile};
    let mut report = match &args.score_items {
        Some(path) => {
            // main prints only the outermost message: the cause goes into it.
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
            let file: ItemsFile = serde_json::from_str(&text).map_err(|e| {
                anyhow::anyhow!(
                    "{} is not an items file written by `qwen-vl eval --items` or tools/micro/eval_hf.py: {e}",
                    path.display()
                )
            })?;
            eprintln!(
                "scoring {} items of {} ({} scenes, seed {})",
                file.items.len(),
                path.display(),
                file.n,
                file.seed
            );
            eval::rescore(&file)?
        }
        None => {
            let (Some(n), Some(seed)) = (args.synthetic, args.seed) else {
                bail!("give --synthetic N and --seed S (or --score-items FILE)");
            };
            if n == 0 {
                bail!("--synthetic must be at least 1");
            }
            if args.max_new_tokens == 0 {
                bail!("--max-new-tokens must be at least 1");
            }
            let (rt, _) = load(&args.model)?;
            let mut options = EvalOptions {
                max_new_tokens: args.max_new_tokens,
                caches: !args.no_cache,
                ..Default::default()
            };
            options.pipeline.caches = !args.no_cache;
            eprintln!(
                "evaluating {} ({}) on {}: scenes 0..{n} of seed {seed}",
                rt.source.display(),
                rt.family(),
                rt.model.device.adapter.name
            );
            let bar = ProgressBar::new(n as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} eval [{bar:30}] {pos}/{len} scenes ({elapsed})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            let report = eval::run(&rt, n, seed, &options, &mut |p: Progress| {
                bar.set_position(p.done as u64)
            });
            bar.finish_and_clear();
            let mut report = report?;
            if let Some(path) = &args.items {
                write_eval_items(path, &rt, n, seed, args.max_new_tokens, &mut report.items)?;
            }
            report
        }
    };
    if args.json {
        if !args.verbose {
            report.items.clear();
        }
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    if args.verbose {
        for it in &report.items {
            let score = match it.iou {
                Some(v) => format!("IoU {v:.2}"),
                None if it.correct => "ok".into(),
                None => "wrong".into(),
            };
            println!(
                "scene {:>4} {:<9} {:<8} {:<9} {:?} -> {:?} (expected {:?})",
                it.scene,
                it.kind.name(),
                if it.pipeline { "pipeline" } else { "direct" },
                score,
                it.prompt,
                it.output,
                it.expected
            );
        }
        println!();
    }
    use qwen_vl::synth::QuestionKind;
    let fmt = |v: Option<f64>| v.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into());
    let acc = &report.accuracy;
    println!("{} scene{}", report.n, if report.n == 1 { "" } else { "s" });
    println!("{:<10} {:>6}  score", "kind", "asked");
    for (kind, value) in [
        (QuestionKind::Colour, acc.colour),
        (QuestionKind::Shape, acc.shape),
        (QuestionKind::Count, acc.count),
        (QuestionKind::Position, acc.position),
        (QuestionKind::YesNo, acc.yesno),
    ] {
        println!(
            "{:<10} {:>6}  {}",
            kind.name(),
            report.asked(kind),
            fmt(value)
        );
    }
    println!(
        "{:<10} {:>6}  mean IoU {}, IoU >= {}: {}",
        "grounding",
        report.asked(QuestionKind::Grounding),
        fmt(report.grounding.mean_iou),
        eval::IOU_THRESHOLD,
        fmt(report.grounding.iou_ge_0_5)
    );
    println!(
        "{:<10} {:>6}  {}",
        "pipeline",
        report.pipeline_asked(),
        fmt(report.pipeline.answer_accuracy)
    );
    Ok(())
}

/// Writes the items file and each scene's picture into `STEM_scenes/` next to it, recording the
/// picture's relative path in its items.
fn write_eval_items(
    path: &Path,
    rt: &Runtime,
    n: usize,
    seed: u64,
    max_new_tokens: usize,
    items: &mut [qwen_vl::eval::EvalItem],
) -> Result<()> {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
        .with_context(|| format!("--items {} has no file name", path.display()))?;
    let folder_name = format!("{stem}_scenes");
    let folder = path
        .parent()
        .unwrap_or_else(|| Path::new(""))
        .join(&folder_name);
    std::fs::create_dir_all(&folder)
        .with_context(|| format!("creating {} (is it writable?)", folder.display()))?;
    for index in 0..n as u64 {
        let name = format!("scene_{seed}_{index:06}.png");
        qwen_vl::synth::scene(seed, index)
            .render()
            .save(folder.join(&name))
            .with_context(|| format!("writing {}", folder.join(&name).display()))?;
        let relative = format!("{folder_name}/{name}");
        for it in items.iter_mut().filter(|it| it.scene == index) {
            it.image = Some(relative.clone());
        }
    }
    let file = qwen_vl::eval::ItemsFile {
        model: rt.source.display().to_string(),
        family: rt.family().model_type().to_string(),
        seed,
        n,
        max_new_tokens,
        items: items.to_vec(),
    };
    std::fs::write(path, serde_json::to_string_pretty(&file)?)
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!(
        "{} items -> {} (scenes in {})",
        items.len(),
        path.display(),
        folder.display()
    );
    Ok(())
}
