//! GPTQ over a whole model: the [`StageQuantizer`] the layer-by-layer driver calls. For each
//! stage it builds H = 2XXᵀ from every window's inputs (one Gram matrix per window, summed in
//! f64), prepares H once for the linears that share it (q/k/v; gate/up), runs GPTQ on each
//! linear the plan quantizes, and keeps its encoding (GGML blocks or GPTQ layout) for the
//! writer. Linears the plan
//! leaves in F16 (rows that do not split into blocks) keep their original weights.

use std::collections::{HashMap, HashSet};

use candle_core::Tensor;

use super::gptq::{self, GptqConfig, Hessian, Prepared};
use super::layerwise::{LayerwiseError, StageInputs, StageQuantizer};
use super::tensor_quant::{tensor_error, TensorError};

/// Encoded bytes and error of every quantized linear, by GGUF tensor name (`blk.0.attn_q.weight`).
pub type QuantizedTensors = HashMap<String, (Vec<u8>, TensorError)>;

pub struct GptqModel {
    config: GptqConfig,
    /// GGUF names (with `.weight`) of the tensors to quantize.
    wanted: HashSet<String>,
    pub tensors: QuantizedTensors,
}

impl GptqModel {
    pub fn new(config: GptqConfig, wanted: HashSet<String>) -> Self {
        Self {
            config,
            wanted,
            tensors: HashMap::new(),
        }
    }
}

/// H of the inputs: the sum of each window's XᵀX (a gemm per window).
pub fn hessian(inputs: &[Tensor], cols: usize) -> candle_core::Result<Hessian> {
    let mut h = Hessian::new(cols);
    for x in inputs {
        let gram = x.t()?.matmul(x)?;
        h.add_gram(&gram.flatten_all()?.to_vec1::<f32>()?, x.dim(0)?);
    }
    Ok(h)
}

impl StageQuantizer for GptqModel {
    fn quantize(&mut self, stage: StageInputs<'_>) -> Result<Vec<Vec<f32>>, LayerwiseError> {
        let wanted: Vec<bool> = stage
            .linears
            .iter()
            .map(|l| self.wanted.contains(&format!("{}.weight", l.name)))
            .collect();
        if !wanted.iter().any(|&w| w) {
            return Ok(stage.linears.iter().map(|l| l.weight.clone()).collect());
        }
        let cols = stage.linears[0].cols;
        let h = hessian(stage.inputs, cols)?;
        let prepared = Prepared::new(&h, self.config.damp_percent, self.config.act_order)
            .map_err(|e| LayerwiseError::Method(format!("layer {}: {e}", stage.layer)))?;
        let format = self.config.format;
        let mut out = Vec::with_capacity(stage.linears.len());
        for (l, wanted) in stage.linears.iter().zip(wanted) {
            if !wanted {
                out.push(l.weight.clone());
                continue;
            }
            let q = gptq::quantize(&l.weight, l.rows, l.cols, &prepared, &self.config)
                .map_err(|e| LayerwiseError::Method(format!("{}: {e}", l.name)))?;
            let bytes = format.encode(&q.levels, &q.params, l.rows, l.cols);
            let err = tensor_error(&l.weight, &q.weights);
            self.tensors
                .insert(format!("{}.weight", l.name), (bytes, err));
            out.push(q.weights);
        }
        Ok(out)
    }
}
