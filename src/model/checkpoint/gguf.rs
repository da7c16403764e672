//! Opening a GGUF checkpoint: the config from its metadata, every GGML tensor mapped in place,
//! and the weights quantd stores as several tensors (`PREFIX.<part>`: the GPTQ layout, int8
//! rows, bnb4 blocks) gathered per prefix, checked complete and consistent, and recorded as one
//! weight each.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use super::{
    invalid, mmap, order_and_check, Checkpoint, CheckpointError, Format, LayoutPart, SourceDtype,
    TensorRef,
};
use crate::formats::bnb4;
use crate::formats::gguf::{GgufFile, GgufTensorInfo, TensorType};
use crate::formats::gptq_layout::{self, PackedLinear, PartType};
use crate::formats::int8_rows;

/// The forms of a weight stored as several GGUF tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Parted {
    Gptq,
    Int8,
    Bnb4,
}

impl Parted {
    const ALL: [Parted; 3] = [Self::Gptq, Self::Int8, Self::Bnb4];

    /// Part suffixes and element types, in the format's order.
    fn parts(self) -> &'static [(&'static str, PartType)] {
        match self {
            Self::Gptq => &gptq_layout::PARTS,
            Self::Int8 => &int8_rows::PARTS,
            Self::Bnb4 => &bnb4::PARTS,
        }
    }

    /// The form and part a tensor name's last component names, if any.
    fn of(suffix: &str) -> Option<(Self, usize)> {
        Self::ALL.into_iter().find_map(|form| {
            let i = form.parts().iter().position(|(s, _)| *s == suffix)?;
            Some((form, i))
        })
    }

    /// Whether a part may have this tensor type (bnb4's absmax is F32, or I8 codes with double
    /// quantization).
    fn accepts(self, part: usize, dtype: TensorType) -> bool {
        let (suffix, want) = self.parts()[part];
        want.tensor_type() == dtype
            || (self == Self::Bnb4 && suffix == "bnb4_absmax" && dtype == TensorType::I8)
    }

    fn stored(self) -> &'static str {
        match self {
            Self::Gptq => "in the GPTQ layout",
            Self::Int8 => "as int8 rows",
            Self::Bnb4 => "in bnb4 parts",
        }
    }

    /// The weight the parts of `prefix` make: its shape, source type and the parts in order,
    /// or why they do not make one.
    fn weight<'a>(
        self,
        prefix: &str,
        p: &[Option<&'a GgufTensorInfo>],
    ) -> Result<(Vec<usize>, SourceDtype, Vec<&'a GgufTensorInfo>), String> {
        match self {
            Self::Gptq => {
                let [Some(qweight), Some(qzeros), Some(scales), Some(g_idx)] = p[..] else {
                    let missing = self
                        .parts()
                        .iter()
                        .zip(p)
                        .filter(|(_, t)| t.is_none())
                        .map(|((s, _), _)| format!("{prefix}.{s}"))
                        .collect::<Vec<_>>()
                        .join(", ");
                    return Err(format!("GPTQ-layout tensor {missing} is missing"));
                };
                let ([_, rows], [cols]) = (qweight.shape.as_slice(), g_idx.shape.as_slice()) else {
                    return Err(format!("{prefix}.qweight/g_idx are not 2-D/1-D"));
                };
                let all = [qweight, qzeros, scales, g_idx];
                let (bits, _) =
                    PackedLinear::check_shapes(*rows, *cols, all.map(|t| t.shape.as_slice()))
                        .map_err(|e| format!("{prefix}: {e}"))?;
                Ok((
                    vec![*rows, *cols],
                    SourceDtype::GptqLayout { bits },
                    all.to_vec(),
                ))
            }
            Self::Int8 => {
                let [Some(levels), Some(scales)] = p[..] else {
                    return Err(format!(
                        "int8 weight {prefix} needs both {prefix}.int8_weight and \
                         {prefix}.int8_scale"
                    ));
                };
                let [rows, cols] = levels.shape[..] else {
                    return Err(format!("{prefix}.int8_weight is not 2-D"));
                };
                if scales.shape != [rows] {
                    return Err(format!(
                        "{prefix}.int8_scale has shape {:?}, expected [{rows}]",
                        scales.shape
                    ));
                }
                Ok((
                    vec![rows, cols],
                    SourceDtype::Int8Rows,
                    vec![levels, scales],
                ))
            }
            Self::Bnb4 => {
                let present: Vec<&GgufTensorInfo> = p.iter().map_while(|t| *t).collect();
                let double = p[2].is_some_and(|t| t.dtype == TensorType::I8);
                let want = if double { 6 } else { 3 };
                if present.len() != want || p.iter().filter(|t| t.is_some()).count() != want {
                    let names: Vec<String> = bnb4::Format::parts(double)
                        .iter()
                        .map(|(s, _)| format!("{prefix}.{s}"))
                        .collect();
                    return Err(format!(
                        "bnb4 weight {prefix} needs exactly {}",
                        names.join(", ")
                    ));
                }
                let [rows, packed_cols] = present[0].shape[..] else {
                    return Err(format!("{prefix}.bnb4_weight is not 2-D"));
                };
                Ok((vec![rows, packed_cols * 2], SourceDtype::Bnb4, present))
            }
        }
    }
}

impl Checkpoint {
    pub fn open_gguf(path: &Path, name: &str) -> Result<Self, CheckpointError> {
        let file = GgufFile::open(path).map_err(|e| invalid(name, e.to_string()))?;
        let config = crate::model::gguf_config::config_from_gguf(&file).map_err(|e| match e {
            CheckpointError::Invalid { message, .. } => invalid(name, message),
            other => other,
        })?;
        let mut found = HashMap::new();
        let mut grouped: BTreeMap<(Parted, String), Vec<Option<&GgufTensorInfo>>> = BTreeMap::new();
        for t in &file.tensors {
            let (prefix, suffix) = t.name.rsplit_once('.').unwrap_or((&t.name, ""));
            if let Some((form, i)) = Parted::of(suffix) {
                if !form.accepts(i, t.dtype) {
                    return Err(invalid(
                        name,
                        format!("tensor {} has type {}", t.name, t.dtype.name()),
                    ));
                }
                grouped
                    .entry((form, prefix.to_string()))
                    .or_insert_with(|| vec![None; form.parts().len()])[i] = Some(t);
                continue;
            }
            let Some(dtype) = t.dtype.ggml() else {
                return Err(invalid(
                    name,
                    format!(
                        "tensor {} has type {}, which only GPTQ-layout, int8 and bnb4 parts may have",
                        t.name,
                        t.dtype.name()
                    ),
                ));
            };
            found.insert(
                t.name.clone(),
                TensorRef {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                    dtype: SourceDtype::Ggml(dtype),
                    file: 0,
                    offset: t.offset,
                    len: t.size,
                },
            );
        }
        let mut parts = Vec::new();
        for ((form, prefix), p) in grouped {
            let (shape, dtype, present) = form
                .weight(&prefix, &p)
                .map_err(|message| invalid(name, message))?;
            let weight = format!("{prefix}.weight");
            if found.contains_key(&weight) {
                return Err(invalid(
                    name,
                    format!("{weight} is stored both as a tensor and {}", form.stored()),
                ));
            }
            found.insert(
                weight.clone(),
                TensorRef {
                    name: weight,
                    shape,
                    dtype,
                    file: parts.len(),
                    offset: 0,
                    len: present.iter().map(|t| t.size).sum(),
                },
            );
            parts.push(
                present
                    .iter()
                    .map(|t| LayoutPart {
                        shape: t.shape.clone(),
                        file: 0,
                        offset: t.offset,
                        len: t.size,
                    })
                    .collect(),
            );
        }
        let tensors = order_and_check(&config, found, name)?;
        Ok(Self {
            format: Format::Gguf,
            config,
            tensors,
            side_files: BTreeMap::new(),
            gguf_metadata: file.metadata,
            maps: vec![mmap(path, name)?],
            computed: Vec::new(),
            parts,
        })
    }
}
