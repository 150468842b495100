//! Prompts to token ids, exactly as the checkpoint's own tokenizer does it.
//!
//! Guarantee: ids come from the artifact's `tokenizer.json` through the `tokenizers` crate
//! (the same code as transformers' fast tokenizers), with the special tokens the checkpoint
//! adds; a prompt longer than the text encoder's context is an error, never cut silently,
//! because a cut prompt describes another class than the one its author wrote.

use std::path::{Path, PathBuf};

use tokenizers::Tokenizer;

use super::artifact::TextSettings;
use super::{ModelError, TokenBatch};

pub struct PromptTokenizer {
    inner: Tokenizer,
    path: PathBuf,
    context_length: usize,
    pad_id: i64,
}

impl PromptTokenizer {
    pub fn load(path: &Path, settings: &TextSettings) -> Result<Self, ModelError> {
        let inner = Tokenizer::from_file(path).map_err(|e| ModelError::Tokenizer {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Ok(Self::from_tokenizer(inner, path, settings))
    }

    pub fn from_tokenizer(mut inner: Tokenizer, path: &Path, settings: &TextSettings) -> Self {
        // Length checks and padding are ours: a tokenizer.json may carry its own truncation.
        inner
            .with_truncation(None)
            .expect("disabling truncation cannot fail. This is a bug.");
        inner.with_padding(None);
        Self {
            inner,
            path: path.to_path_buf(),
            context_length: settings.context_length,
            pad_id: settings.pad_token_id,
        }
    }

    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// The ids of one prompt, special tokens included, unpadded.
    pub fn encode(&self, prompt: &str) -> Result<Vec<i64>, ModelError> {
        let encoding = self
            .inner
            .encode(prompt, true)
            .map_err(|e| ModelError::Tokenizer {
                path: self.path.clone(),
                message: format!("prompt {prompt:?}: {e}"),
            })?;
        let ids: Vec<i64> = encoding.get_ids().iter().map(|&i| i64::from(i)).collect();
        if ids.len() > self.context_length {
            return Err(ModelError::PromptTooLong {
                prompt: prompt.to_string(),
                tokens: ids.len(),
                max: self.context_length,
            });
        }
        Ok(ids)
    }

    /// Ids as CLIP's reference `tokenize` returns them for text of any length: cut to the
    /// context with the end-of-text token kept last. Only for comparisons with reference
    /// implementations; prompts go through [`Self::encode`], which refuses to cut.
    pub fn encode_truncated(&self, text: &str) -> Result<Vec<i64>, ModelError> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(|e| ModelError::Tokenizer {
                path: self.path.clone(),
                message: format!("{text:?}: {e}"),
            })?;
        let mut ids: Vec<i64> = encoding.get_ids().iter().map(|&i| i64::from(i)).collect();
        if ids.len() > self.context_length {
            let last = *ids
                .last()
                .expect("an over-long encoding is not empty. This is a bug.");
            ids.truncate(self.context_length);
            ids[self.context_length - 1] = last;
        }
        Ok(ids)
    }

    /// Pad encoded prompts to the context length, with the attention mask.
    pub fn batch(&self, encoded: &[Vec<i64>]) -> TokenBatch {
        let len = self.context_length;
        let mut ids = Vec::with_capacity(encoded.len() * len);
        let mut mask = Vec::with_capacity(encoded.len() * len);
        for e in encoded {
            assert!(
                e.len() <= len,
                "encoded prompt longer than the context. This is a bug."
            );
            ids.extend_from_slice(e);
            ids.extend(std::iter::repeat_n(self.pad_id, len - e.len()));
            mask.extend(std::iter::repeat_n(1, e.len()));
            mask.extend(std::iter::repeat_n(0, len - e.len()));
        }
        TokenBatch {
            ids,
            mask,
            n: encoded.len(),
            len,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A word-level tokenizer over a tiny vocabulary, with a context of 4.
    pub(crate) fn word_tokenizer() -> PromptTokenizer {
        let json = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,
            "pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
            "model":{"type":"WordLevel","vocab":{"[UNK]":0,"x":1,"y":2,"a":3,"b":4},"unk_token":"[UNK]"}}"#;
        let inner: Tokenizer = json.parse().unwrap();
        let settings = TextSettings {
            context_length: 4,
            pad_token_id: 9,
            inputs: vec!["input_ids".into()],
        };
        PromptTokenizer::from_tokenizer(inner, Path::new("words.json"), &settings)
    }

    #[test]
    fn pads_with_the_pad_id_and_masks() {
        let t = word_tokenizer();
        let a = t.encode("x y").unwrap();
        let b = t.encode("a").unwrap();
        assert_eq!((a.clone(), b.clone()), (vec![1, 2], vec![3]));
        let batch = t.batch(&[a, b]);
        assert_eq!(batch.ids, [1, 2, 9, 9, 3, 9, 9, 9]);
        assert_eq!(batch.mask, [1, 1, 0, 0, 1, 0, 0, 0]);
        assert_eq!((batch.n, batch.len), (2, 4));
    }

    #[test]
    fn an_over_long_prompt_is_an_error_naming_it() {
        let t = word_tokenizer();
        let err = t.encode("a b x y a").unwrap_err();
        assert!(
            matches!(
                err,
                ModelError::PromptTooLong {
                    tokens: 5,
                    max: 4,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("\"a b x y a\""), "{err}");
        assert_eq!(t.encode_truncated("a b x y a").unwrap(), [3, 4, 1, 3]);
    }
}
