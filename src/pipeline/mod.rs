//! The multi-phase visual-reasoning pipeline: reasoning steps, grounding, evidence, synthesis.

pub mod parse;
pub mod prompts;
