//! Text side of the prompt: the Hugging Face `tokenizer.json` (through `tokenizers`), the model's own
//! Jinja chat template (through minijinja, set up like transformers' sandbox), `<|image_pad|>`
//! expansion, the EOS ids, and streaming detokenisation.
//!
//! What transformers 5.23 does, and this file copies:
//! - `processor.apply_chat_template` renders the template with `trim_blocks` and `lstrip_blocks`,
//!   the variables `messages`, `tools = None`, `documents = None`, `add_generation_prompt` and the
//!   tokenizer's named special tokens (`eos_token`, `pad_token`, ...), the globals
//!   `raise_exception` and `namespace`, Python's string/dict methods, and a `tojson` filter that
//!   is `json.dumps` with `ensure_ascii=False`. (Its `strftime_now` is left out: no Qwen-VL
//!   template calls it.)
//! - The processor then replaces the i-th `<|image_pad|>` by as many copies as image i has merged
//!   patches and tokenizes with no special tokens added.
//! - The template is the processor's: `processor_config.json` `chat_template`, else
//!   `chat_template.json`, else `chat_template.jinja`. A processor with none of these fails; this
//!   runtime falls back to what `AutoTokenizer` uses instead (`tokenizer_config.json`
//!   `chat_template`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use minijinja::value::{Enumerator, Kwargs, Object, ObjectRepr, Value, ValueKind};
use minijinja::{Environment, Error as JinjaError, ErrorKind as JinjaErrorKind};
use serde_json::Value as Json;
use tokenizers::Tokenizer;

/// Everything that can go wrong while loading the tokenizer files, rendering a chat or
/// (de)tokenizing.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("`{}` not found: {hint}", path.display())]
    MissingFile { path: PathBuf, hint: &'static str },

    #[error("cannot read `{}`: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{file} is not valid JSON ({source}); re-download it from the model repository")]
    Json {
        file: &'static str,
        #[source]
        source: serde_json::Error,
    },

    #[error("{file}: `{field}` must be {expected}")]
    BadField {
        file: &'static str,
        field: &'static str,
        expected: &'static str,
    },

    #[error("tokenizer.json could not be loaded ({0}); it must be a Hugging Face fast-tokenizer file (the model repository's tokenizer.json)")]
    Load(String),

    #[error("special token `{0}` is not in tokenizer.json; this is not a Qwen2-VL / Qwen2.5-VL / Qwen3-VL tokenizer")]
    MissingSpecialToken(&'static str),

    #[error("no chat template: looked for processor_config.json `chat_template`, chat_template.json, chat_template.jinja and tokenizer_config.json `chat_template`; copy chat_template.json from the model repository")]
    NoChatTemplate,

    #[error("the chat template from {origin} does not compile: {detail}")]
    TemplateSyntax {
        origin: &'static str,
        detail: String,
    },

    #[error("the chat template from {origin} failed to render these messages: {detail}")]
    TemplateRender {
        origin: &'static str,
        detail: String,
    },

    #[error("the prompt has {found} <|image_pad|> token(s) but {given} image token count(s) were given; pass one count per image, in prompt order")]
    ImageCountMismatch { found: usize, given: usize },

    #[error("image {index} has an image token count of 0; each image needs t*h*w/4 >= 1 tokens")]
    ZeroImageTokens { index: usize },

    #[error("tokenization failed: {0}")]
    Encode(String),

    #[error("detokenization failed: {0}")]
    Decode(String),
}

/// Ids of the Qwen-VL control tokens, looked up by their text in `tokenizer.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialTokens {
    pub im_start: u32,
    pub im_end: u32,
    pub endoftext: u32,
    pub vision_start: u32,
    pub vision_end: u32,
    pub image_pad: u32,
    pub video_pad: u32,
    pub box_start: Option<u32>,
    pub box_end: Option<u32>,
    pub object_ref_start: Option<u32>,
    pub object_ref_end: Option<u32>,
}

impl SpecialTokens {
    fn lookup(tok: &Tokenizer) -> Result<Self, TokenizerError> {
        let required = |s: &'static str| {
            tok.token_to_id(s)
                .ok_or(TokenizerError::MissingSpecialToken(s))
        };
        Ok(Self {
            im_start: required("<|im_start|>")?,
            im_end: required("<|im_end|>")?,
            endoftext: required("<|endoftext|>")?,
            vision_start: required("<|vision_start|>")?,
            vision_end: required("<|vision_end|>")?,
            image_pad: required("<|image_pad|>")?,
            video_pad: required("<|video_pad|>")?,
            box_start: tok.token_to_id("<|box_start|>"),
            box_end: tok.token_to_id("<|box_end|>"),
            object_ref_start: tok.token_to_id("<|object_ref_start|>"),
            object_ref_end: tok.token_to_id("<|object_ref_end|>"),
        })
    }
}

/// One item of a message: rendered by the template as `{"type": "image"}` or
/// `{"type": "text", "text": ...}`, the way transformers' processors take them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    Image,
    Text(String),
}

/// One chat turn. A `system` message made only of text reaches the template as a plain string
/// (`{"role": "system", "content": "..."}`, as it is usually written for transformers); every
/// other message reaches it as a list of typed items. The official Qwen-VL templates render both
/// forms the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: Vec<Content>,
}

impl ChatMessage {
    pub fn system(text: impl Into<String>) -> Self {
        Self {
            role: "system".into(),
            content: vec![Content::Text(text.into())],
        }
    }

    pub fn user(content: Vec<Content>) -> Self {
        Self {
            role: "user".into(),
            content,
        }
    }

    pub fn assistant(text: impl Into<String>) -> Self {
        Self {
            role: "assistant".into(),
            content: vec![Content::Text(text.into())],
        }
    }

    fn to_template_value(&self) -> Value {
        let text_only = self.content.iter().all(|c| matches!(c, Content::Text(_)));
        let content = if self.role == "system" && text_only {
            let text: String = self
                .content
                .iter()
                .filter_map(|c| match c {
                    Content::Text(t) => Some(t.as_str()),
                    Content::Image => None,
                })
                .collect();
            Value::from(text)
        } else {
            self.content
                .iter()
                .map(|c| match c {
                    Content::Image => Dict::value(vec![("type", Value::from("image"))]),
                    Content::Text(t) => Dict::value(vec![
                        ("type", Value::from("text")),
                        ("text", Value::from(t.as_str())),
                    ]),
                })
                .collect()
        };
        Dict::value(vec![
            ("role", Value::from(self.role.as_str())),
            ("content", content),
        ])
    }
}

/// A template dict that keeps insertion order, like the Python dicts transformers passes
/// (minijinja's own maps are sorted unless its `preserve_order` feature is on).
#[derive(Debug)]
struct Dict(Vec<(&'static str, Value)>);

impl Dict {
    fn value(entries: Vec<(&'static str, Value)>) -> Value {
        Value::from_object(Dict(entries))
    }
}

impl Object for Dict {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let key = key.as_str()?;
        self.0
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.clone())
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Values(self.0.iter().map(|(k, _)| Value::from(*k)).collect())
    }
}

/// The contents of a model directory's tokenizer files, for builds without a file system (web).
/// Only `tokenizer_json` is required.
#[derive(Debug, Clone, Default)]
pub struct TokenizerFiles {
    pub tokenizer_json: String,
    pub tokenizer_config_json: Option<String>,
    pub chat_template_jinja: Option<String>,
    pub chat_template_json: Option<String>,
    pub processor_config_json: Option<String>,
    pub generation_config_json: Option<String>,
    pub config_json: Option<String>,
}

impl TokenizerFiles {
    /// Reads the files from `dir`; a missing optional file is `None`.
    pub fn read_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer_json = read_optional(&tokenizer_path)?.ok_or(TokenizerError::MissingFile {
            path: tokenizer_path,
            hint: "the model directory needs the Hugging Face fast tokenizer file tokenizer.json (download it from the model repository)",
        })?;
        Ok(Self {
            tokenizer_json,
            tokenizer_config_json: read_optional(&dir.join("tokenizer_config.json"))?,
            chat_template_jinja: read_optional(&dir.join("chat_template.jinja"))?,
            chat_template_json: read_optional(&dir.join("chat_template.json"))?,
            processor_config_json: read_optional(&dir.join("processor_config.json"))?,
            generation_config_json: read_optional(&dir.join("generation_config.json"))?,
            config_json: read_optional(&dir.join("config.json"))?,
        })
    }
}

fn read_optional(path: &Path) -> Result<Option<String>, TokenizerError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TokenizerError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn parse_json(file: &'static str, text: &str) -> Result<Json, TokenizerError> {
    serde_json::from_str(text).map_err(|source| TokenizerError::Json { file, source })
}

/// The chat template source and where it came from.
struct TemplateSource {
    text: String,
    origin: &'static str,
}

/// A `chat_template` field: a string, or a list of `{name, template}` of which "default" is used.
fn template_field(
    file: &'static str,
    value: Option<&Json>,
) -> Result<Option<String>, TokenizerError> {
    let bad = TokenizerError::BadField {
        file,
        field: "chat_template",
        expected: "a string or a list of {\"name\", \"template\"} objects with a \"default\" entry",
    };
    match value {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Array(items)) => {
            let default = items
                .iter()
                .find(|t| t.get("name") == Some(&Json::from("default")));
            match default
                .and_then(|t| t.get("template"))
                .and_then(Json::as_str)
            {
                Some(s) => Ok(Some(s.to_owned())),
                None => Err(bad),
            }
        }
        Some(_) => Err(bad),
    }
}

fn find_chat_template(
    files: &TokenizerFiles,
    tokenizer_config: Option<&Json>,
) -> Result<Option<TemplateSource>, TokenizerError> {
    if let Some(text) = &files.processor_config_json {
        let cfg = parse_json("processor_config.json", text)?;
        if let Some(t) = template_field("processor_config.json", cfg.get("chat_template"))? {
            return Ok(Some(TemplateSource {
                text: t,
                origin: "processor_config.json",
            }));
        }
    }
    if let Some(text) = &files.chat_template_json {
        let cfg = parse_json("chat_template.json", text)?;
        let t = template_field("chat_template.json", cfg.get("chat_template"))?.ok_or(
            TokenizerError::BadField {
                file: "chat_template.json",
                field: "chat_template",
                expected: "present (the file holds {\"chat_template\": \"...\"})",
            },
        )?;
        return Ok(Some(TemplateSource {
            text: t,
            origin: "chat_template.json",
        }));
    }
    if let Some(text) = &files.chat_template_jinja {
        return Ok(Some(TemplateSource {
            text: text.clone(),
            origin: "chat_template.jinja",
        }));
    }
    if let Some(cfg) = tokenizer_config {
        if let Some(t) = template_field("tokenizer_config.json", cfg.get("chat_template"))? {
            return Ok(Some(TemplateSource {
                text: t,
                origin: "tokenizer_config.json",
            }));
        }
    }
    Ok(None)
}

/// The named special tokens transformers passes to every template (`special_tokens_map`).
fn named_special_tokens(tokenizer_config: Option<&Json>) -> Vec<(&'static str, String)> {
    const NAMES: [&str; 7] = [
        "bos_token",
        "eos_token",
        "unk_token",
        "sep_token",
        "pad_token",
        "cls_token",
        "mask_token",
    ];
    let Some(cfg) = tokenizer_config else {
        return Vec::new();
    };
    NAMES
        .iter()
        .filter_map(|&name| {
            let v = cfg.get(name)?;
            // Either "<|im_end|>" or a serialized AddedToken {"content": "<|im_end|>", ...}.
            let s = v.as_str().or_else(|| v.get("content")?.as_str())?;
            Some((name, s.to_owned()))
        })
        .collect()
}

/// `eos_token_id` of a config: an integer, a list of integers, or absent/null.
fn eos_field(file: &'static str, value: Option<&Json>) -> Result<Vec<u32>, TokenizerError> {
    let bad = || TokenizerError::BadField {
        file,
        field: "eos_token_id",
        expected: "a token id or a list of token ids",
    };
    let as_id = |v: &Json| v.as_u64().and_then(|n| u32::try_from(n).ok());
    match value {
        None | Some(Json::Null) => Ok(Vec::new()),
        Some(Json::Array(items)) => items.iter().map(|v| as_id(v).ok_or_else(bad)).collect(),
        Some(v) => as_id(v).map(|id| vec![id]).ok_or_else(bad),
    }
}

fn find_eos_ids(files: &TokenizerFiles, im_end: u32) -> Result<Vec<u32>, TokenizerError> {
    let mut ids = Vec::new();
    if let Some(text) = &files.generation_config_json {
        let cfg = parse_json("generation_config.json", text)?;
        ids = eos_field("generation_config.json", cfg.get("eos_token_id"))?;
    }
    if ids.is_empty() {
        if let Some(text) = &files.config_json {
            let cfg = parse_json("config.json", text)?;
            ids = eos_field("config.json", cfg.get("eos_token_id"))?;
            if ids.is_empty() {
                let text_cfg = cfg.get("text_config").and_then(|t| t.get("eos_token_id"));
                ids = eos_field("config.json", text_cfg)?;
            }
        }
    }
    if ids.is_empty() {
        ids.push(im_end);
    }
    let mut unique = Vec::with_capacity(ids.len());
    for id in ids {
        if !unique.contains(&id) {
            unique.push(id);
        }
    }
    Ok(unique)
}

const TEMPLATE_NAME: &str = "chat_template";

/// A minijinja environment that behaves like transformers' `ImmutableSandboxedEnvironment` for
/// chat templates.
fn template_env(source: TemplateSource) -> Result<Environment<'static>, TokenizerError> {
    let mut env = Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .map_err(|e| TokenizerError::TemplateSyntax {
            origin: source.origin,
            detail: e.to_string(),
        })?;
    env.set_syntax(syntax);
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    // Python prints None/True/False where minijinja would print none/true/false.
    env.set_formatter(|out, state, value| match value.kind() {
        ValueKind::None => out.write_str("None").map_err(JinjaError::from),
        ValueKind::Bool => out
            .write_str(if value.is_true() { "True" } else { "False" })
            .map_err(JinjaError::from),
        _ => minijinja::escape_formatter(out, state, value),
    });
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<Value, JinjaError> {
            Err(JinjaError::new(JinjaErrorKind::InvalidOperation, msg))
        },
    );
    env.add_filter("tojson", tojson);
    let origin = source.origin;
    env.add_template_owned(TEMPLATE_NAME, source.text)
        .map_err(|e| TokenizerError::TemplateSyntax {
            origin,
            detail: jinja_detail(&e),
        })?;
    Ok(env)
}

/// The error with its causes, on one line (minijinja puts the template line in the message).
fn jinja_detail(e: &JinjaError) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

/// transformers' `tojson` filter: `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, with its arguments positional or by keyword. (minijinja's own `tojson`
/// escapes `<>&'` for HTML, which would change prompts.)
fn tojson(value: &Value, args: &[Value], kwargs: Kwargs) -> Result<Value, JinjaError> {
    const NAMES: [&str; 4] = ["ensure_ascii", "indent", "separators", "sort_keys"];
    if args.len() > NAMES.len() {
        return Err(JinjaError::new(
            JinjaErrorKind::TooManyArguments,
            "tojson takes at most 4 arguments (ensure_ascii, indent, separators, sort_keys)",
        ));
    }
    let pick = |i: usize| -> Result<Option<Value>, JinjaError> {
        match args.get(i) {
            Some(v) => Ok(Some(v.clone())),
            None => kwargs.get::<Option<Value>>(NAMES[i]),
        }
    };
    let ensure_ascii = pick(0)?.is_some_and(|v| v.is_true());
    let sort_keys = pick(3)?.is_some_and(|v| v.is_true());
    let indent = match pick(1)? {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_owned()),
            None => {
                let n = i64::try_from(v)?;
                Some(" ".repeat(usize::try_from(n).unwrap_or(0)))
            }
        },
    };
    let (item_sep, key_sep) = match pick(2)? {
        Some(v) if !v.is_none() => {
            let parts: Vec<String> = v
                .try_iter()?
                .map(|p| p.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .ok_or_else(|| {
                    JinjaError::new(
                        JinjaErrorKind::InvalidOperation,
                        "tojson: separators must be two strings",
                    )
                })?;
            match <[String; 2]>::try_from(parts) {
                Ok([a, b]) => (a, b),
                Err(_) => {
                    return Err(JinjaError::new(
                        JinjaErrorKind::InvalidOperation,
                        "tojson: separators must be two strings",
                    ))
                }
            }
        }
        _ if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        _ => (", ".to_owned(), ": ".to_owned()),
    };
    kwargs.assert_all_used()?;
    let style = PyJson {
        ensure_ascii,
        sort_keys,
        indent,
        item_sep,
        key_sep,
    };
    let mut out = String::new();
    style.write(&mut out, value, 0)?;
    Ok(Value::from(out))
}

struct PyJson {
    ensure_ascii: bool,
    sort_keys: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
}

impl PyJson {
    fn newline(&self, out: &mut String, depth: usize) {
        if let Some(ind) = &self.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(ind);
            }
        }
    }

    fn write(&self, out: &mut String, v: &Value, depth: usize) -> Result<(), JinjaError> {
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number if v.is_integer() => out.push_str(&v.to_string()),
            ValueKind::Number => out.push_str(&python_float_repr(f64::try_from(v.clone())?)),
            ValueKind::String => self.write_str(out, v.as_str().unwrap_or_default()),
            ValueKind::Seq => {
                let items: Vec<Value> = v.try_iter()?.collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(out, depth + 1);
                    self.write(out, item, depth + 1)?;
                }
                self.newline(out, depth);
                out.push(']');
            }
            ValueKind::Map => {
                let mut entries = Vec::new();
                for key in v.try_iter()? {
                    let item = v.get_item(&key)?;
                    entries.push((json_key(&key)?, item));
                }
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                }
                if entries.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                out.push('{');
                for (i, (key, item)) in entries.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(out, depth + 1);
                    self.write_str(out, key);
                    out.push_str(&self.key_sep);
                    self.write(out, item, depth + 1)?;
                }
                self.newline(out, depth);
                out.push('}');
            }
            kind => {
                return Err(JinjaError::new(
                    JinjaErrorKind::InvalidOperation,
                    format!("tojson: a {kind} value is not JSON serializable"),
                ))
            }
        }
        Ok(())
    }

    fn write_str(&self, out: &mut String, s: &str) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{08}' => out.push_str("\\b"),
                '\u{0c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c if self.ensure_ascii && !(' '..='~').contains(&c) => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// Python's `json.dumps` turns non-string keys into strings.
fn json_key(key: &Value) -> Result<String, JinjaError> {
    Ok(match key.kind() {
        ValueKind::String => key.as_str().unwrap_or_default().to_owned(),
        ValueKind::None => "null".to_owned(),
        ValueKind::Bool => (if key.is_true() { "true" } else { "false" }).to_owned(),
        ValueKind::Number if key.is_integer() => key.to_string(),
        ValueKind::Number => python_float_repr(f64::try_from(key.clone())?),
        kind => {
            return Err(JinjaError::new(
                JinjaErrorKind::InvalidOperation,
                format!("tojson: keys must be str, int, float, bool or None, not {kind}"),
            ))
        }
    })
}

/// `repr(float)` as Python writes it: shortest round-trip digits, exponent form outside
/// 1e-4 <= |x| < 1e16 (`1e+16`, `1.5e-07`), and `NaN` / `Infinity` as `json.dumps` does.
fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    // `{:e}` gives the shortest round-trip digits: "-1.2345e-7".
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let n = digits.len() as i32;
        let s = if exp >= n - 1 {
            format!("{digits}{}.0", "0".repeat((exp - (n - 1)) as usize))
        } else if exp >= 0 {
            let (a, b) = digits.split_at((exp + 1) as usize);
            format!("{a}.{b}")
        } else {
            format!("0.{}{digits}", "0".repeat((-exp - 1) as usize))
        };
        format!("{sign}{s}")
    } else {
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{mantissa}e{esign}{:02}", exp.abs())
    }
}

/// A Qwen-VL tokenizer: `tokenizer.json` plus the chat template, special-token ids and EOS ids of
/// one model directory.
pub struct QwenTokenizer {
    tokenizer: Tokenizer,
    specials: SpecialTokens,
    eos_ids: Vec<u32>,
    /// The compiled chat template and the file it came from.
    template: Option<(Environment<'static>, &'static str)>,
    special_token_vars: Vec<(&'static str, String)>,
}

impl std::fmt::Debug for QwenTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QwenTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("specials", &self.specials)
            .field("eos_ids", &self.eos_ids)
            .field("chat_template", &self.chat_template_origin())
            .finish()
    }
}

impl QwenTokenizer {
    /// Loads `tokenizer.json` and the optional files next to it (see [`TokenizerFiles`]).
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        Self::from_files(&TokenizerFiles::read_dir(dir)?)
    }

    /// For the web build: the file contents, each optional except `tokenizer.json`.
    pub fn from_files(files: &TokenizerFiles) -> Result<Self, TokenizerError> {
        let mut tokenizer = Tokenizer::from_bytes(files.tokenizer_json.as_bytes())
            .map_err(|e| TokenizerError::Load(e.to_string()))?;
        // transformers calls the tokenizer with truncation and padding off; a tokenizer.json that
        // sets them must not cut or pad prompts here either.
        tokenizer
            .with_truncation(None)
            .map_err(|e| TokenizerError::Load(e.to_string()))?;
        tokenizer.with_padding(None);
        let specials = SpecialTokens::lookup(&tokenizer)?;

        let tokenizer_config = match &files.tokenizer_config_json {
            Some(text) => Some(parse_json("tokenizer_config.json", text)?),
            None => None,
        };
        let template = match find_chat_template(files, tokenizer_config.as_ref())? {
            Some(src) => {
                let origin = src.origin;
                Some((template_env(src)?, origin))
            }
            None => None,
        };
        Ok(Self {
            eos_ids: find_eos_ids(files, specials.im_end)?,
            special_token_vars: named_special_tokens(tokenizer_config.as_ref()),
            tokenizer,
            specials,
            template,
        })
    }

    pub fn specials(&self) -> &SpecialTokens {
        &self.specials
    }

    /// Generation stops at any of these: generation_config.json `eos_token_id` (an id or a list),
    /// else config.json `eos_token_id` (top level, then `text_config`), else `<|im_end|>`.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// Which file the chat template came from, if there is one.
    pub fn chat_template_origin(&self) -> Option<&'static str> {
        self.template.as_ref().map(|(_, origin)| *origin)
    }

    /// The prompt text the model's chat template makes of `messages`, as
    /// `processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let Some((env, origin)) = &self.template else {
            return Err(TokenizerError::NoChatTemplate);
        };
        let origin = *origin;
        let render_err = |e: JinjaError| TokenizerError::TemplateRender {
            origin,
            detail: jinja_detail(&e),
        };
        let template = env.get_template(TEMPLATE_NAME).map_err(render_err)?;
        let mut ctx: BTreeMap<&str, Value> = self
            .special_token_vars
            .iter()
            .map(|(k, v)| (*k, Value::from(v.as_str())))
            .collect();
        let messages: Vec<Value> = messages
            .iter()
            .map(ChatMessage::to_template_value)
            .collect();
        ctx.insert("messages", Value::from(messages));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        ctx.insert("tools", Value::from(()));
        ctx.insert("documents", Value::from(()));
        template.render(Value::from(ctx)).map_err(render_err)
    }

    /// The prompt ids for `messages` with the generation prompt added, as the HF processor makes
    /// them: render, tokenize without added special tokens, then repeat the i-th `<|image_pad|>`
    /// `image_token_counts[i]` times (t*h*w/4 for a grid of t*h*w patches).
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        image_token_counts: &[usize],
    ) -> Result<Vec<u32>, TokenizerError> {
        let prompt = self.render(messages, true)?;
        self.encode_prompt(&prompt, image_token_counts)
    }

    /// Tokenizes an already rendered prompt and expands its `<|image_pad|>` tokens (see
    /// [`Self::encode_chat`]).
    pub fn encode_prompt(
        &self,
        prompt: &str,
        image_token_counts: &[usize],
    ) -> Result<Vec<u32>, TokenizerError> {
        let ids = self.encode_text(prompt)?;
        let pad = self.specials.image_pad;
        let found = ids.iter().filter(|&&id| id == pad).count();
        if found != image_token_counts.len() {
            return Err(TokenizerError::ImageCountMismatch {
                found,
                given: image_token_counts.len(),
            });
        }
        if let Some(index) = image_token_counts.iter().position(|&n| n == 0) {
            return Err(TokenizerError::ZeroImageTokens { index });
        }
        let extra: usize = image_token_counts.iter().map(|n| n - 1).sum();
        let mut out = Vec::with_capacity(ids.len() + extra);
        let mut counts = image_token_counts.iter();
        for id in ids {
            if id == pad {
                // There is one count per pad (checked above).
                let n = counts.next().copied().unwrap_or(1);
                out.extend(std::iter::repeat_n(pad, n));
            } else {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// Token ids of `text` (no special tokens added; special-token text such as `<|im_end|>` in
    /// `text` becomes that token, as in transformers).
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .tokenizer
            .encode_fast(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`. Ids outside the tokenizer's vocabulary (the embedding matrix has padding
    /// rows) decode to nothing, as in transformers.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// Number of token ids the tokenizer knows, added tokens included (`len(tokenizer)` in
    /// transformers; 151669 for Qwen3's tokenizer). The model's vocabulary can be larger.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }
}

/// Incremental detokeniser for streaming: push one id, get the newly completed text.
///
/// A byte-level BPE token can end inside a UTF-8 character; such text is held back until the
/// character completes. The concatenation of all pieces (including [`Self::finish`]) equals
/// `decode(all ids)`. Each step decodes only the ids since the last emitted boundary.
#[derive(Debug, Clone, Default)]
pub struct TextStream {
    ids: Vec<u32>,
    /// `ids[..read]` has been emitted; `ids[..prefix]` is no longer needed for context.
    prefix: usize,
    read: usize,
    skip_special_tokens: bool,
}

impl TextStream {
    pub fn new(skip_special_tokens: bool) -> Self {
        Self {
            skip_special_tokens,
            ..Self::default()
        }
    }

    /// Adds `id`; returns the text it completes (often empty while a character is split).
    pub fn push(&mut self, tok: &QwenTokenizer, id: u32) -> Result<String, TokenizerError> {
        self.ids.push(id);
        let seen = tok.decode(&self.ids[self.prefix..self.read], self.skip_special_tokens)?;
        let text = tok.decode(&self.ids[self.prefix..], self.skip_special_tokens)?;
        if text.len() <= seen.len() || text.ends_with(char::REPLACEMENT_CHARACTER) {
            return Ok(String::new());
        }
        let piece = new_suffix(&text, &seen);
        // Keep one emitted chunk as context for the next decode, drop the rest.
        self.ids.drain(..self.read);
        self.prefix = 0;
        self.read = self.ids.len();
        // After the drain, ids[..read] is the chunk just emitted, which becomes the context.
        Ok(piece)
    }

    /// Returns whatever is still held back (an unfinished character decodes to U+FFFD) and
    /// resets the stream.
    pub fn finish(&mut self, tok: &QwenTokenizer) -> Result<String, TokenizerError> {
        let seen = tok.decode(&self.ids[self.prefix..self.read], self.skip_special_tokens)?;
        let text = tok.decode(&self.ids[self.prefix..], self.skip_special_tokens)?;
        let piece = new_suffix(&text, &seen);
        self.ids.clear();
        self.prefix = 0;
        self.read = 0;
        Ok(piece)
    }
}

/// `text` minus its leading `seen` (decoding more ids only appends text for byte-level BPE).
fn new_suffix(text: &str, seen: &str) -> String {
    text.strip_prefix(seen)
        .or_else(|| text.get(seen.len()..))
        .unwrap_or_default()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::python_float_repr;

    #[test]
    fn float_repr_matches_python() {
        // Right-hand sides are Python 3.11's repr() of the same literals.
        let cases = [
            (0.1, "0.1"),
            (100.0, "100.0"),
            (1e-4, "0.0001"),
            (0.00012, "0.00012"),
            (123456789012345.6, "123456789012345.6"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (-0.5, "-0.5"),
            (1.5e300, "1.5e+300"),
            (5e-324, "5e-324"),
            (2.5e-7, "2.5e-07"),
            (1.0 / 3.0, "0.3333333333333333"),
            (12345.678, "12345.678"),
        ];
        for (x, want) in cases {
            assert_eq!(python_float_repr(x), want, "repr({x:e})");
        }
    }
}
