//! The token stream an evaluation scores: the whole text tokenized once, without special
//! tokens, and the BOS that goes at each window's start only when the tokenizer adds one by
//! itself (DESIGN §5: "no BOS unless the model requires it").

use tokenizers::Tokenizer;

pub struct EvalTokens {
    pub ids: Vec<u32>,
    pub bos: Option<u32>,
}

pub fn eval_tokens(tokenizer: &Tokenizer, text: &str) -> Result<EvalTokens, String> {
    let encode = |s: &str, special: bool| -> Result<Vec<u32>, String> {
        Ok(tokenizer
            .encode(s, special)
            .map_err(|e| format!("tokenizing: {e}"))?
            .get_ids()
            .to_vec())
    };
    let ids = encode(text, false)?;
    let with_special = encode("a", true)?;
    let plain = encode("a", false)?;
    let bos = (with_special.len() > plain.len()).then(|| with_special[0]);
    Ok(EvalTokens { ids, bos })
}
