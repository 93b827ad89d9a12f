//! `convergence attention`'s library side on a small random MMDiT: the captured maps of both
//! blocks (the last one `context_pre_only`) equal softmax(Q K^T / sqrt(d)) recomputed from the
//! blocks' own weights, the picture writer reads them in that layout (the full matrix, a word's
//! image->text column on the row-major patch grid, steps chosen or averaged), and writes the
//! expected files. (tests/mmdit.rs checks block 0 of the diffusers fixtures the same way.)

mod common;
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarMap;
use common::assert_close;
use convergence::models::sd3::{SD3Config, SD3Transformer2DModel};
use convergence::nn::{AttentionCapture, Init, JointAttentionMap};
use convergence::viz::attention::{write_attention_maps, AttentionFigures, LayerAttention, StepChoice};
use convergence::weights::init::seeded_var_builder;
use convergence::Result;
use std::sync::Arc;

const ATOL: f32 = 1e-5;
const HEADS: usize = 2;
/// 8x8 pixels, patch 2: a 4x4 grid of 16 image tokens; 5 text tokens.
const GRID: usize = 4;
const TEXT: usize = 5;

fn config() -> SD3Config {
    SD3Config {
        sample_size: 8,
        patch_size: 2,
        in_channels: 3,
        out_channels: Some(3),
        num_layers: 2,
        num_attention_heads: HEADS,
        attention_head_dim: 8,
        caption_projection_dim: 16,
        joint_attention_dim: 12,
        pooled_projection_dim: 6,
        pos_embed_max_size: Some(GRID),
        ..Default::default()
    }
}

/// A random model (every weight non-zero, adaLN included) and its variables.
fn model() -> Result<(SD3Transformer2DModel, VarMap)> {
    let vm = VarMap::new();
    let vb = seeded_var_builder(&vm, 11, DType::F32, &Device::Cpu);
    Ok((SD3Transformer2DModel::new(vb, &config(), Init::Default)?, vm))
}

struct Inputs {
    x: Tensor,
    context: Tensor,
    pooled: Tensor,
}

/// A batch of 2 ([uncond, cond] under guidance).
fn inputs() -> Result<Inputs> {
    let dev = Device::Cpu;
    let cfg = config();
    Ok(Inputs {
        x: Tensor::randn(0f32, 1., (2, 3, 8, 8), &dev)?,
        context: Tensor::randn(0f32, 1., (2, TEXT, cfg.joint_attention_dim), &dev)?,
        pooled: Tensor::randn(0f32, 1., (2, cfg.pooled_projection_dim), &dev)?,
    })
}

fn var(vm: &VarMap, name: &str) -> Tensor {
    let data = vm.data().lock().expect("varmap");
    data.get(name).unwrap_or_else(|| panic!("no variable {name}")).as_tensor().clone()
}

/// x W^T + b of the linear at `name`.
fn apply(vm: &VarMap, name: &str, x: &Tensor) -> Result<Tensor> {
    let y = x.broadcast_matmul(&var(vm, &format!("{name}.weight")).t()?)?;
    Ok(y.broadcast_add(&var(vm, &format!("{name}.bias")))?)
}

/// LayerNorm without affine (eps 1e-6), then x (1 + scale) + shift.
fn modulated(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let x_hat = centred.broadcast_div(&(var + 1e-6)?.sqrt()?)?;
    let scaled = x_hat.broadcast_mul(&(scale.unsqueeze(1)? + 1.0)?)?;
    Ok(scaled.broadcast_add(&shift.unsqueeze(1)?)?)
}

/// The linear at `name` split into heads [B, H, L, d].
fn heads(vm: &VarMap, name: &str, x: &Tensor) -> Result<Tensor> {
    let y = apply(vm, name, x)?;
    let (b, l, hd) = y.dims3()?;
    Ok(y.reshape((b, l, HEADS, hd / HEADS))?.transpose(1, 2)?.contiguous()?)
}

/// softmax(Q K^T / sqrt(d)) of joint block `i` over [image, text], [B, H, L, L], from the block's
/// inputs. Block 0 modulates the text with adaLN-Zero ([shift, scale, ...]); the last block
/// (`context_pre_only`) with AdaLayerNormContinuous ([scale, shift]).
fn recomputed(vm: &VarMap, i: usize, x: &Tensor, ctx: &Tensor, temb: &Tensor) -> Result<Tensor> {
    let p = format!("transformer_blocks.{i}");
    let c = temb.silu()?;
    let mx = apply(vm, &format!("{p}.norm1.linear"), &c)?.chunk(6, 1)?;
    let hx = modulated(x, &mx[0], &mx[1])?;
    let hc = if i == 0 {
        let mc = apply(vm, &format!("{p}.norm1_context.linear"), &c)?.chunk(6, 1)?;
        modulated(ctx, &mc[0], &mc[1])?
    } else {
        let mc = apply(vm, &format!("{p}.norm1_context.linear"), &c)?.chunk(2, 1)?;
        modulated(ctx, &mc[1], &mc[0])?
    };
    let joint = |img: &str, txt: &str| -> Result<Tensor> {
        let parts =
            [heads(vm, &format!("{p}.attn.{img}"), &hx)?, heads(vm, &format!("{p}.attn.{txt}"), &hc)?];
        Ok(Tensor::cat(&parts, 2)?)
    };
    let (q, k) = (joint("to_q", "add_q_proj")?, joint("to_k", "add_k_proj")?);
    let s = (q.matmul(&k.t()?)? / (q.dim(D::Minus1)? as f64).sqrt())?;
    let e = s.broadcast_sub(&s.max_keepdim(D::Minus1)?)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// The probabilities of both blocks for one model call at timestep `t`.
fn both_blocks(m: &SD3Transformer2DModel, vm: &VarMap, io: &Inputs, t: f32) -> Result<[Tensor; 2]> {
    let t = Tensor::new(&[t, t], &Device::Cpu)?;
    let x0 = m.embed_image(&io.x)?;
    let temb = m.conditioning(&t, &io.pooled)?;
    let c0 = m.embed_context(&io.context)?;
    let p0 = recomputed(vm, 0, &x0, &c0, &temb)?;
    let (c1, x1) = m.transformer_blocks()[0].forward(&x0, &c0, &temb, None, None)?;
    let p1 = recomputed(vm, 1, &x1, &c1.expect("block 0 keeps the text stream"), &temb)?;
    Ok([p0, p1])
}

/// Two model calls (two sampling steps) with `capture` attached.
fn captured(
    m: &SD3Transformer2DModel,
    io: &Inputs,
    capture: AttentionCapture,
) -> Result<Vec<JointAttentionMap>> {
    let capture = Arc::new(capture);
    let mut m = m.clone();
    m.set_attention_capture(Some(capture.clone()));
    for t in TIMES {
        m.forward_text(&io.x, &Tensor::new(&[t, t], &Device::Cpu)?, &io.context, &io.pooled)?;
    }
    Ok(capture.take())
}

const TIMES: [f32; 2] = [900., 250.];
const N: usize = GRID * GRID;

#[test]
fn captured_maps_equal_a_recomputation_in_the_layout_the_pictures_use() -> Result<()> {
    let (m, vm) = model()?;
    let io = inputs()?;
    let reference = TIMES.iter().map(|&t| both_blocks(&m, &vm, &io, t)).collect::<Result<Vec<_>>>()?;
    let per_head = captured(&m, &io, AttentionCapture::new(8).heads(&[0, 1]))?;
    let mean = captured(&m, &io, AttentionCapture::new(8))?;
    assert_eq!(
        per_head.iter().map(|m| (m.layer, m.call)).collect::<Vec<_>>(),
        [(0, 0), (1, 0), (0, 1), (1, 1)]
    );

    let q = |p: &Tensor, rows: (usize, usize), cols: (usize, usize)| -> Result<Tensor> {
        Ok(p.narrow(2, rows.0, rows.1)?.narrow(3, cols.0, cols.1)?)
    };
    let (img, txt) = ((0, N), (N, TEXT));
    for (call, probs) in reference.iter().enumerate() {
        for (layer, p) in probs.iter().enumerate() {
            // The capture's quadrants, per head and averaged.
            let map = &per_head[2 * call + layer];
            let what = |s: &str| format!("layer {layer} call {call} {s}");
            assert_close(&what("image->image"), &map.image_to_image, &q(p, img, img)?, ATOL, 0.0);
            assert_close(&what("image->text"), &map.image_to_text, &q(p, img, txt)?, ATOL, 0.0);
            assert_close(&what("text->image"), &map.text_to_image, &q(p, txt, img)?, ATOL, 0.0);
            assert_close(&what("text->text"), &map.text_to_text, &q(p, txt, txt)?, ATOL, 0.0);
            let p_mean = p.mean_keepdim(1)?;
            assert_close(
                &what("mean image->text"),
                &mean[2 * call + layer].image_to_text,
                &q(&p_mean, img, txt)?,
                ATOL,
                0.0,
            );

            // What the writer draws for the conditional image (batch 1): the full matrix, and
            // word k's column on the patch grid, image token r * gw + c at row r, column c.
            let step = StepChoice::Call(call);
            let att = LayerAttention::select(&per_head, layer, 1, step)?;
            assert_close(&what("joint"), &att.joint()?, &p.get(1)?, ATOL, 0.0);
            let att_mean = LayerAttention::select(&mean, layer, 1, step)?;
            assert_close(&what("joint mean"), &att_mean.joint()?, &p_mean.get(1)?, ATOL, 0.0);
            let cond = p.get(1)?.get(1)?; // batch 1, head 1: [L, L]
            for k in 0..TEXT {
                let grid = att.token_map(1, k, (GRID, GRID))?.to_vec2::<f32>()?;
                for (r, c) in (0..GRID).flat_map(|r| (0..GRID).map(move |c| (r, c))) {
                    let want = cond.get(r * GRID + c)?.get(N + k)?.to_scalar::<f32>()?;
                    assert!(
                        (grid[r][c] - want).abs() <= ATOL,
                        "{}: token {k} patch ({r}, {c})",
                        what("grid")
                    );
                }
            }
        }
    }
    // The mean over steps is the mean of the two recomputations.
    for (layer, (first, second)) in reference[0].iter().zip(&reference[1]).enumerate() {
        let att = LayerAttention::select(&mean, layer, 1, StepChoice::Mean)?;
        let avg = ((first.mean_keepdim(1)? + second.mean_keepdim(1)?)? / 2.0)?;
        assert_close("mean over steps", &att.joint()?, &avg.get(1)?, ATOL, 0.0);
        assert_eq!(att.calls, [0, 1]);
    }
    Ok(())
}

#[test]
fn image_token_i_is_the_patch_at_row_i_div_gw_column_i_mod_gw() -> Result<()> {
    // The grid reshape above is only right if the patch embedding orders tokens row-major.
    let (m, _) = model()?;
    let x = Tensor::zeros((1, 3, 8, 8), DType::F32, &Device::Cpu)?;
    let (r, c) = (1usize, 2usize);
    let bump = Tensor::ones((1, 3, 2, 2), DType::F32, &Device::Cpu)?;
    let bumped = x.slice_assign(&[0..1, 0..3, 2 * r..2 * r + 2, 2 * c..2 * c + 2], &bump)?;
    let diff = (m.embed_image(&bumped)? - m.embed_image(&x)?)?.abs()?.sum(D::Minus1)?.flatten_all()?;
    let changed: Vec<usize> =
        diff.to_vec1::<f32>()?.iter().enumerate().filter(|(_, &d)| d > 0.0).map(|(i, _)| i).collect();
    assert_eq!(changed, [r * GRID + c]);
    Ok(())
}

#[test]
fn the_writer_produces_the_expected_files_for_a_two_layer_model() -> Result<()> {
    let (m, _) = model()?;
    let io = inputs()?;
    let maps = captured(&m, &io, AttentionCapture::new(8))?;
    let dir = std::env::temp_dir().join(format!("conv-attention-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    let tokens: Vec<String> =
        ["<bos>", "red", "circle", "<eos>", "<pad>"].iter().map(|s| s.to_string()).collect();
    let words = [1, 2, 3];
    // A black image: a heatmap pixel over it is exactly alpha x the viridis colour.
    let image = Tensor::full(-1f32, (3, 8, 8), &Device::Cpu)?;
    let figures = AttentionFigures {
        image: &image,
        grid: (GRID, GRID),
        tokens: &tokens,
        words: &words,
        scale: 8,
        alpha: 0.5,
    };
    let written = write_attention_maps(&maps, &figures, &[], 1, StepChoice::Last, &dir)?;
    let names: Vec<String> =
        written.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    let mut expected = vec!["image.png".to_string()];
    for l in 0..2 {
        expected.push(format!("quadrants_layer{l}_step2.png"));
        expected.extend(["token1_red", "token2_circle", "token3_eos"].map(|t| format!("{t}_layer{l}.png")));
        expected.push(format!("tokens_layer{l}.png"));
    }
    assert_eq!(names, expected);
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    on_disk.sort();
    let mut sorted = expected.clone();
    sorted.sort();
    assert_eq!(on_disk, sorted, "no other files (no temporaries left)");
    assert_eq!(image::image_dimensions(dir.join("image.png")).unwrap(), (64, 64));

    // The overlay of 'circle' in layer 1: its brightest block sits on the patch that attends to
    // it most, the image 64x64 with a label band under it.
    let att = LayerAttention::select(&maps, 1, 1, StepChoice::Last)?;
    let map = att.token_map(0, 2, (GRID, GRID))?.flatten_all()?.to_vec1::<f32>()?;
    let top = (0..N).max_by(|&a, &b| map[a].total_cmp(&map[b])).unwrap();
    let overlay = image::open(dir.join("token2_circle_layer1.png")).unwrap().to_rgb8();
    assert_eq!(overlay.width(), 64);
    assert!(overlay.height() > 64);
    let (px, py) = ((top % GRID) as u32 * 16 + 8, (top / GRID) as u32 * 16 + 8);
    let brightest = convergence::viz::viridis(1.0).0.map(|v| (v as f32 * 0.5).round() as u8);
    assert_eq!(overlay.get_pixel(px, py).0, brightest);

    // Per-head files when heads are kept, and the mean over steps.
    let maps = captured(&m, &io, AttentionCapture::new(8).layers(&[1]).heads(&[1]))?;
    let written = write_attention_maps(&maps, &figures, &[1], 1, StepChoice::Mean, &dir.join("h"))?;
    let names: Vec<String> =
        written.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(names[1], "quadrants_layer1_stepall_head1.png");
    assert_eq!(names[2], "token1_red_layer1_head1.png");
    assert_eq!(names.last().unwrap(), "tokens_layer1_head1.png");
    let err = write_attention_maps(&maps, &figures, &[0], 1, StepChoice::Last, &dir).unwrap_err();
    assert!(err.to_string().contains("captured layers: 1"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}
