//! Special tokens on the way to GGUF: gguf-py's `SpecialVocab`, which finds the bos/eos/unk/
//! sep/pad/mask ids, decides the `add_bos_token` / `add_eos_token` / `add_sep_token` flags and
//! carries the merges and chat template along to be written.
//!
//! The ids come from tokenizer_config.json matched against tokenizer.json's added tokens, then
//! from config.json-style files; the flags come from tokenizer_config.json and from a crude read
//! of the post-processor, exactly as convert reads it (including its quirks).

use candle_core::quantized::gguf_file::Value;
use serde_json::{Map, Value as Json};

use super::to_gguf::{gguf_merges, string_array, token_content, write_chat_template, KvList};
use super::{Result, TokenizerGgufError, KEY_MERGES};

/// The tokenizer_config.json names convert compares post-processor tokens against.
struct SpecialNames {
    bos: Option<Json>,
    cls: Option<Json>,
    eos: Option<Json>,
    sep: Option<Json>,
}

impl SpecialNames {
    fn is(entry: &Option<Json>, id: &str) -> bool {
        entry.as_ref().and_then(Json::as_str) == Some(id)
    }
}

/// Python truthiness of a JSON value: null, false, 0, "", [] and {} are false.
fn truthy(value: Option<&Json>) -> bool {
    match value {
        None | Some(Json::Null) => false,
        Some(Json::Bool(b)) => *b,
        Some(Json::Number(n)) => n.as_f64() != Some(0.0),
        Some(Json::String(s)) => !s.is_empty(),
        Some(Json::Array(a)) => !a.is_empty(),
        Some(Json::Object(o)) => !o.is_empty(),
    }
}

/// gguf-py's `SpecialVocab`: merges, special token ids, add_*_token flags and chat template.
pub(super) struct SpecialVocab {
    types: Vec<&'static str>,
    ids: Vec<(&'static str, u32)>,
    add: Vec<(&'static str, bool)>,
    merges: Vec<String>,
    chat_template: Option<Json>,
    n_vocab: Option<usize>,
}

impl SpecialVocab {
    /// `_try_load_from_tokenizer_json`, with tokenizer_config.json already parsed.
    pub(super) fn from_tokenizer_files(
        json: &Json,
        tokenizer_config: Option<&Json>,
        n_vocab: Option<usize>,
        load_merges: bool,
    ) -> Result<Self> {
        let mut sv = SpecialVocab {
            types: vec!["bos", "eos", "unk", "sep", "pad", "cls", "mask"],
            ids: Vec::new(),
            add: Vec::new(),
            merges: if load_merges {
                gguf_merges(&json["model"]["merges"])?
            } else {
                Vec::new()
            },
            chat_template: None,
            n_vocab,
        };
        let mut tc: Map<String, Json> = tokenizer_config
            .and_then(Json::as_object)
            .cloned()
            .unwrap_or_default();
        let mut names = SpecialNames {
            bos: tc.get("bos_token").cloned(),
            cls: tc.get("cls_token").cloned(),
            eos: tc.get("eos_token").cloned(),
            sep: tc.get("sep_token").cloned(),
        };
        if !truthy(names.bos.as_ref()) && truthy(names.cls.as_ref()) && !tc.is_empty() {
            names.bos = names.cls.clone();
            tc.insert("bos_token".into(), names.bos.clone().unwrap_or_default());
        }
        if !truthy(names.eos.as_ref()) && truthy(names.sep.as_ref()) && !tc.is_empty() {
            names.eos = names.sep.clone();
            tc.insert("eos_token".into(), names.eos.clone().unwrap_or_default());
        }
        sv.read_post_processor(&json["post_processor"], &mut names, &mut tc);
        if tc.is_empty() {
            return Ok(sv);
        }
        sv.chat_template = tc
            .get("chat_template")
            .filter(|t| t.is_string() || t.is_array())
            .cloned();
        let added = json["added_tokens"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        for typ in sv.types.clone() {
            if let Some(add) = tc.get(&format!("add_{typ}_token")).and_then(Json::as_bool) {
                sv.set_add(typ, add);
            }
            let Some(content) = tc.get(&format!("{typ}_token")).and_then(token_content) else {
                continue;
            };
            let id = added
                .iter()
                .find(|a| a["content"] == content.as_str())
                .and_then(|a| a["id"].as_i64());
            if let Some(id) = id {
                sv.set_id(typ, id, "tokenizer.json")?;
            }
        }
        Ok(sv)
    }

    fn set_add(&mut self, typ: &'static str, add: bool) {
        match self.add.iter_mut().find(|(t, _)| *t == typ) {
            Some(slot) => slot.1 = add,
            None => self.add.push((typ, add)),
        }
    }

    /// `_set_special_token`: the first source to name a type wins; out-of-range ids are skipped.
    fn set_id(&mut self, typ: &'static str, id: i64, file: &'static str) -> Result<()> {
        if id < 0 {
            let problem = format!("is {id}; token ids cannot be negative");
            return Err(TokenizerGgufError::Config {
                file,
                field: format!("{typ}_token_id"),
                problem,
            });
        }
        let in_range = self.n_vocab.is_none_or(|n| (id as u64) < n as u64);
        if in_range && !self.ids.iter().any(|(t, _)| *t == typ) {
            self.ids.push((typ, id as u32));
        }
        Ok(())
    }

    /// `_try_load_from_config_json`: `{typ}_token_id`, or the same inside text_config.
    pub(super) fn read_ids(&mut self, config: &Json, file: &'static str) -> Result<()> {
        for typ in self.types.clone() {
            let key = format!("{typ}_token_id");
            let value = config
                .get(&key)
                .filter(|v| !v.is_null())
                .or_else(|| config["text_config"].get(&key));
            if let Some(id) = value.and_then(Json::as_i64) {
                self.set_id(typ, id, file)?;
            }
        }
        Ok(())
    }

    /// The post-processor walk: RobertaProcessing adds bos/eos/sep; TemplateProcessing is read
    /// crudely, exactly as convert does, for a leading bos, trailing eos and a pair separator.
    fn read_post_processor(
        &mut self,
        pp: &Json,
        names: &mut SpecialNames,
        tc: &mut Map<String, Json>,
    ) {
        if !truthy(Some(pp)) {
            return;
        }
        let processors = pp
            .get("processors")
            .and_then(Json::as_array)
            .cloned()
            .unwrap_or_else(|| vec![pp.clone()]);
        for processor in &processors {
            match processor["type"].as_str() {
                Some("RobertaProcessing") => self.read_roberta(processor, names, tc),
                Some("TemplateProcessing") => self.read_template(processor, names, tc),
                _ => {}
            }
        }
    }

    fn read_roberta(
        &mut self,
        processor: &Json,
        names: &mut SpecialNames,
        tc: &mut Map<String, Json>,
    ) {
        for typ in ["bos", "eos", "sep"] {
            self.set_add(typ, true);
        }
        adopt_roberta_token(processor, "cls", &names.bos, &mut names.cls, tc);
        adopt_roberta_token(processor, "sep", &names.eos, &mut names.sep, tc);
    }

    fn read_template(
        &mut self,
        processor: &Json,
        names: &mut SpecialNames,
        tc: &mut Map<String, Json>,
    ) {
        let single = processor["single"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        let (mut first, mut last) = (None, None);
        if single.len() > 1 {
            first = template_special(&single[0]);
            if let Some(first) = &first {
                if tc.is_empty() {
                    names.bos = Some(Json::String(first.clone()));
                }
                self.set_add(
                    "bos",
                    SpecialNames::is(&names.bos, first) || SpecialNames::is(&names.cls, first),
                );
            }
            last = template_special(&single[single.len() - 1]);
            if let Some(last) = &last {
                if tc.is_empty() {
                    names.eos = Some(Json::String(last.clone()));
                } else if !SpecialNames::is(&names.eos, last) {
                    self.keep_replaced_eos(names.eos.clone().unwrap_or_default(), tc);
                    tc.insert("eos_token".into(), Json::String(last.clone()));
                    names.eos = Some(Json::String(last.clone()));
                }
                // The trailing token has just become the eos token either way.
                self.set_add("eos", true);
            }
        }
        let pair = processor["pair"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        self.read_pair_template(pair, first.as_deref(), last.as_deref(), names, tc);
    }

    /// When the template's trailing token overrides eos, the old eos lives on as eot (or eom).
    fn keep_replaced_eos(&mut self, old_eos: Json, tc: &mut Map<String, Json>) {
        for typ in ["eot", "eom"] {
            if !self.types.contains(&typ) {
                self.types.push(typ);
                tc.insert(format!("{typ}_token"), old_eos);
                return;
            }
        }
    }

    fn read_pair_template(
        &mut self,
        pair: &[Json],
        first: Option<&str>,
        last: Option<&str>,
        names: &SpecialNames,
        tc: &mut Map<String, Json>,
    ) {
        let Some(final_piece) = pair.last() else {
            return;
        };
        let start = usize::from(first.is_some() && template_special(&pair[0]).as_deref() == first);
        let stop = pair.len()
            - usize::from(last.is_some() && template_special(final_piece).as_deref() == last);
        if start + 3 > stop {
            return; // nothing between "$A" and "$B" once the outer specials are dropped
        }
        let inner = &pair[start..stop];
        let sequence = |piece: &Json| piece["Sequence"]["id"].as_str().map(str::to_owned);
        if sequence(&inner[0]).as_deref() != Some("A")
            || sequence(&inner[inner.len() - 1]).as_deref() != Some("B")
        {
            return;
        }
        let middle = &inner[1..inner.len() - 1];
        let separates = |piece: &Json| {
            template_special(piece).is_some_and(|id| {
                SpecialNames::is(&names.sep, &id) || SpecialNames::is(&names.eos, &id)
            })
        };
        let add_sep = (separates(&middle[0]) && last.is_none())
            || (middle.len() == 2 && separates(&middle[1]));
        self.set_add("sep", add_sep);
        if add_sep && !truthy(names.sep.as_ref()) && !tc.is_empty() {
            tc.insert("sep_token".into(), names.eos.clone().unwrap_or_default());
        }
    }

    pub(super) fn write(self, kv: &mut KvList) {
        if !self.merges.is_empty() {
            kv.set(KEY_MERGES, string_array(self.merges));
        }
        for (typ, id) in self.ids {
            // gguf-py has no writer for cls, so convert skips it with a warning.
            if let Some(key) = id_key(typ) {
                kv.set(key, Value::U32(id));
            }
        }
        for (typ, add) in self.add {
            kv.set(format!("tokenizer.ggml.add_{typ}_token"), Value::Bool(add));
        }
        if let Some(template) = &self.chat_template {
            write_chat_template(kv, template);
        }
    }
}

/// A tokenizer_config without a cls (or sep) token adopts RobertaProcessing's own, falling
/// back to bos (or eos), as convert does.
fn adopt_roberta_token(
    processor: &Json,
    field: &str,
    fallback: &Option<Json>,
    name: &mut Option<Json>,
    tc: &mut Map<String, Json>,
) {
    if truthy(name.as_ref()) || tc.is_empty() {
        return;
    }
    let token = processor[field]
        .get(0)
        .cloned()
        .or_else(|| fallback.clone())
        .unwrap_or_default();
    tc.insert(format!("{field}_token"), token.clone());
    *name = Some(token);
}

fn template_special(piece: &Json) -> Option<String> {
    piece["SpecialToken"]["id"]
        .as_str()
        .filter(|id| !id.is_empty())
        .map(str::to_owned)
}

fn id_key(typ: &str) -> Option<&'static str> {
    Some(match typ {
        "bos" => "tokenizer.ggml.bos_token_id",
        "eos" => "tokenizer.ggml.eos_token_id",
        "unk" => "tokenizer.ggml.unknown_token_id",
        "sep" => "tokenizer.ggml.seperator_token_id", // sic: llama.cpp's spelling
        "pad" => "tokenizer.ggml.padding_token_id",
        "mask" => "tokenizer.ggml.mask_token_id",
        "eot" => "tokenizer.ggml.eot_token_id",
        "eom" => "tokenizer.ggml.eom_token_id",
        _ => return None,
    })
}
