//! The vision-embedding cache: image content hash -> the GPU tensors the language model consumes
//! (merged embeddings, and Qwen3-VL's deepstack features), least-recently-used first out under a
//! byte budget.
//!
//! The key hashes the decoded RGB pixels, every preprocessing parameter and the model identity,
//! so the same file preprocessed differently, or fed to another model, never hits.

use burn::tensor::Tensor;
use lru::LruCache;

use crate::image::PreprocessConfig;

/// A blake3 digest identifying one image as one model sees it.
pub type ImageKey = [u8; 32];

/// Computes the cache key of `image` preprocessed with `cfg` for the model `model_id`.
pub fn image_key(
    image: &::image::RgbImage,
    cfg: &PreprocessConfig,
    model_id: &[u8; 32],
) -> ImageKey {
    let mut h = blake3::Hasher::new();
    h.update(b"qwen-vl image v1");
    h.update(model_id);
    h.update(&(image.width() as u64).to_le_bytes());
    h.update(&(image.height() as u64).to_le_bytes());
    h.update(image.as_raw());
    for v in [
        cfg.patch_size,
        cfg.temporal_patch_size,
        cfg.merge_size,
        cfg.min_pixels,
        cfg.max_pixels,
    ] {
        h.update(&(v as u64).to_le_bytes());
    }
    for v in cfg.image_mean.iter().chain(&cfg.image_std) {
        h.update(&v.to_le_bytes());
    }
    h.update(&cfg.rescale_factor.to_le_bytes());
    h.update(&[
        cfg.do_resize as u8,
        cfg.do_rescale as u8,
        cfg.do_normalize as u8,
    ]);
    *h.finalize().as_bytes()
}

/// One cached image.
#[derive(Clone)]
pub struct CachedImage {
    /// Patch grid `[t, h, w]`.
    pub grid: [usize; 3],
    /// `[tokens, hidden]`
    pub embeds: Tensor<2>,
    /// Qwen3-VL deepstack features, `[tokens, hidden]` each.
    pub deepstack: Vec<Tensor<2>>,
}

impl CachedImage {
    /// Device bytes held.
    pub fn bytes(&self) -> usize {
        std::iter::once(&self.embeds)
            .chain(&self.deepstack)
            .map(|t| t.shape().num_elements() * t.dtype().size())
            .sum()
    }
}

/// Counters of the cache.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct VisionCacheStats {
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Lookups that had to run the vision tower.
    pub misses: u64,
    /// Entries dropped to stay within the budget.
    pub evictions: u64,
    /// Entries not stored because they alone exceed the budget.
    pub rejected: u64,
    /// Bytes held now.
    pub bytes: usize,
    /// Entries held now.
    pub entries: usize,
    /// The byte budget.
    pub budget: usize,
}

/// LRU map from image key to embeddings under a byte budget.
pub struct VisionCache {
    map: LruCache<ImageKey, CachedImage>,
    stats: VisionCacheStats,
}

impl VisionCache {
    /// A cache holding at most `budget` bytes (0 disables it).
    pub fn new(budget: usize) -> Self {
        VisionCache {
            map: LruCache::unbounded(),
            stats: VisionCacheStats {
                budget,
                ..Default::default()
            },
        }
    }

    /// Looks an image up, counting a hit or a miss.
    pub fn get(&mut self, key: &ImageKey) -> Option<CachedImage> {
        match self.map.get(key) {
            Some(e) => {
                self.stats.hits += 1;
                Some(e.clone())
            }
            None => {
                self.stats.misses += 1;
                None
            }
        }
    }

    /// Stores an image, evicting least-recently-used entries until it fits the budget.
    pub fn insert(&mut self, key: ImageKey, value: CachedImage) {
        let size = value.bytes();
        if size > self.stats.budget {
            self.stats.rejected += 1;
            return;
        }
        if let Some(old) = self.map.pop(&key) {
            self.stats.bytes -= old.bytes();
        }
        while self.stats.bytes + size > self.stats.budget {
            match self.map.pop_lru() {
                Some((_, old)) => {
                    self.stats.bytes -= old.bytes();
                    self.stats.evictions += 1;
                }
                None => break,
            }
        }
        self.stats.bytes += size;
        self.map.put(key, value);
        self.stats.entries = self.map.len();
    }

    /// Current counters.
    pub fn stats(&self) -> VisionCacheStats {
        VisionCacheStats {
            entries: self.map.len(),
            ..self.stats.clone()
        }
    }

    /// Drops every entry (counters are kept).
    pub fn clear(&mut self) {
        self.map.clear();
        self.stats.bytes = 0;
        self.stats.entries = 0;
    }
}
