//! Opt-in recording of joint-attention maps. One softmax over [image, text] keys holds four
//! kinds of attention at once (image->image, image->text, text->image, text->text); a capture
//! keeps them as four quadrants per chosen layer and forward call. A model without a capture
//! never materialises more than plain attention does.

use candle_core::{DType, Device, Result, Tensor};
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// Where the image and text tokens sit in a joint sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenOrder {
    /// SD3: [image, text].
    ImageFirst,
    /// Flux: [text, image].
    TextFirst,
}

/// The token layout of one joint attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JointLayout {
    pub order: TokenOrder,
    pub image: usize,
    pub text: usize,
}

impl JointLayout {
    /// (start, len) of the image and of the text tokens.
    fn spans(&self) -> ((usize, usize), (usize, usize)) {
        match self.order {
            TokenOrder::ImageFirst => ((0, self.image), (self.image, self.text)),
            TokenOrder::TextFirst => ((self.text, self.image), (0, self.text)),
        }
    }
}

/// The attention probabilities of one layer in one forward call, split by the modality of the
/// query (rows) and of the key (columns). Each is [B, h, queries, keys] with h = 1 when averaged
/// over heads; a query's row sums to 1 over its two quadrants together.
#[derive(Clone, Debug)]
pub struct JointAttentionMap {
    pub layer: usize,
    /// How many times this layer had been recorded before (the sampling step, for one model call
    /// per step).
    pub call: usize,
    /// The heads kept, in order; `None` when the map is the mean over all heads.
    pub heads: Option<Vec<usize>>,
    pub image_to_image: Tensor,
    pub image_to_text: Tensor,
    pub text_to_image: Tensor,
    pub text_to_text: Tensor,
}

#[derive(Default)]
struct Recorded {
    maps: VecDeque<JointAttentionMap>,
    calls: HashMap<usize, usize>,
    dropped: usize,
}

/// Records joint-attention maps for chosen layers and heads, keeping at most `capacity` maps
/// (the oldest are dropped first), on the CPU in f32 so a long capture holds no device memory.
pub struct AttentionCapture {
    layers: Option<Vec<usize>>,
    heads: Option<Vec<usize>>,
    capacity: usize,
    recorded: Mutex<Recorded>,
}

impl AttentionCapture {
    /// Every joint-attention layer, averaged over heads, at most `capacity` (>= 1) maps.
    pub fn new(capacity: usize) -> Self {
        AttentionCapture { layers: None, heads: None, capacity: capacity.max(1), recorded: Mutex::default() }
    }

    /// Only these layers (indices in forward order; see each model for its numbering).
    pub fn layers(mut self, layers: &[usize]) -> Self {
        self.layers = Some(layers.to_vec());
        self
    }

    /// Keep these heads separately instead of their mean.
    pub fn heads(mut self, heads: &[usize]) -> Self {
        self.heads = Some(heads.to_vec());
        self
    }

    pub fn wants(&self, layer: usize) -> bool {
        self.layers.as_ref().is_none_or(|l| l.contains(&layer))
    }

    /// Splits probabilities [B, H, L, L] over a joint sequence into quadrants and stores them.
    pub fn record(&self, layer: usize, probs: &Tensor, layout: JointLayout) -> Result<()> {
        let (_, _, l, _) = probs.dims4()?;
        if l != layout.image + layout.text {
            candle_core::bail!(
                "attention capture: {l} tokens, layout says {} image + {} text",
                layout.image,
                layout.text
            );
        }
        let kept = match &self.heads {
            None => probs.to_dtype(DType::F32)?.mean_keepdim(1)?,
            Some(h) => {
                let idx = Tensor::from_vec(h.iter().map(|&i| i as u32).collect(), h.len(), probs.device())?;
                probs.index_select(&idx, 1)?.to_dtype(DType::F32)?
            }
        };
        let kept = kept.to_device(&Device::Cpu)?;
        let (image, text) = layout.spans();
        let quadrant = |q: (usize, usize), k: (usize, usize)| {
            kept.narrow(2, q.0, q.1)?.narrow(3, k.0, k.1)?.contiguous()
        };
        let mut rec = self.recorded.lock().expect("capture lock");
        let call = rec.calls.entry(layer).or_insert(0);
        let map = JointAttentionMap {
            layer,
            call: *call,
            heads: self.heads.clone(),
            image_to_image: quadrant(image, image)?,
            image_to_text: quadrant(image, text)?,
            text_to_image: quadrant(text, image)?,
            text_to_text: quadrant(text, text)?,
        };
        *call += 1;
        if rec.maps.len() == self.capacity {
            rec.maps.pop_front();
            rec.dropped += 1;
        }
        rec.maps.push_back(map);
        Ok(())
    }

    /// Hands over the maps recorded so far (oldest first) and starts afresh; call numbering goes on.
    pub fn take(&self) -> Vec<JointAttentionMap> {
        self.recorded.lock().expect("capture lock").maps.drain(..).collect()
    }

    /// How many maps were dropped because the capacity was reached.
    pub fn dropped(&self) -> usize {
        self.recorded.lock().expect("capture lock").dropped
    }
}

/// Where one attention reports to: the capture, the layer's index and the token layout.
#[derive(Clone, Copy)]
pub struct CaptureSite<'a> {
    pub capture: &'a AttentionCapture,
    pub layer: usize,
    pub layout: JointLayout,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probs() -> Result<Tensor> {
        // B=1, H=2, 3 tokens; row-stochastic.
        let p = Tensor::new(
            &[[
                [[0.5f32, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]],
                [[1., 0., 0.], [0., 1., 0.], [0., 0., 1.]],
            ]],
            &Device::Cpu,
        )?;
        Ok(p)
    }

    #[test]
    fn quadrants_follow_token_order_and_head_choice() -> Result<()> {
        let cap = AttentionCapture::new(4);
        let layout = JointLayout { order: TokenOrder::TextFirst, image: 2, text: 1 };
        cap.record(0, &probs()?, layout)?;
        let m = cap.take().remove(0);
        // mean over heads; text is token 0, image tokens 1..3
        assert_eq!(m.text_to_text.flatten_all()?.to_vec1::<f32>()?, vec![0.75]);
        assert_eq!(m.image_to_text.flatten_all()?.to_vec1::<f32>()?, vec![0.05, 0.1]);
        assert_eq!(m.image_to_image.dims(), &[1, 1, 2, 2]);
        let cap = AttentionCapture::new(4).heads(&[1]);
        let layout = JointLayout { order: TokenOrder::ImageFirst, image: 2, text: 1 };
        cap.record(0, &probs()?, layout)?;
        let m = cap.take().remove(0);
        assert_eq!(m.image_to_image.flatten_all()?.to_vec1::<f32>()?, vec![1., 0., 0., 1.]);
        assert_eq!(m.text_to_text.flatten_all()?.to_vec1::<f32>()?, vec![1.]);
        Ok(())
    }

    #[test]
    fn capacity_bounds_memory_and_calls_are_counted_per_layer() -> Result<()> {
        let cap = AttentionCapture::new(2).layers(&[3]);
        assert!(cap.wants(3) && !cap.wants(0));
        let layout = JointLayout { order: TokenOrder::ImageFirst, image: 2, text: 1 };
        for _ in 0..3 {
            cap.record(3, &probs()?, layout)?;
        }
        let maps = cap.take();
        assert_eq!(maps.iter().map(|m| m.call).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(cap.dropped(), 1);
        Ok(())
    }
}
