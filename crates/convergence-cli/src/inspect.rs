//! `convergence inspect`: shapes, token counts, parameters and FLOPs without loading weights.

use anyhow::{bail, Result};

/// Show a model's pipeline stage by stage with tensor shapes, token and attention sizes, exact
/// parameter counts per component and forward FLOPs, computed from the config alone.
#[derive(clap::Args)]
pub struct Args {
    /// A preset (dit-s-2 ... dit-xl-8, sd3-medium, sd3.5-medium, sd3.5-large, flux-dev,
    /// flux-schnell, sdxl-base, sdxl-refiner, sdxl-vae, sd3-vae, flux-vae, clip-l, clip-g, t5-xxl)
    /// or a path to a config.json / model directory.
    model: String,
    /// Image size in pixels, WxH (default: the model's native size).
    #[arg(long)]
    resolution: Option<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn parse_resolution(s: &str) -> Result<(usize, usize)> {
    let Some((w, h)) = s.split_once(['x', 'X']) else {
        bail!("--resolution `{s}`: expected WxH, e.g. 1024x1024");
    };
    match (w.trim().parse(), h.trim().parse()) {
        (Ok(w), Ok(h)) if w > 0 && h > 0 => Ok((w, h)),
        _ => bail!("--resolution `{s}`: expected positive integers WxH"),
    }
}

pub fn run(a: Args) -> Result<()> {
    let resolution = a.resolution.as_deref().map(parse_resolution).transpose()?;
    let summary = convergence::inspect::summarize(&a.model, resolution)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary.json())?);
    } else {
        print!("{}", summary.text());
    }
    Ok(())
}
