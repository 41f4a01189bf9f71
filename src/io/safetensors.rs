//! safetensors files, the one place that decodes and encodes them: a file read whole or its header only,
//! tensor values decoded by dtype (F32, F16, BF16 → f32; U32; I64; U8), tensors encoded with string metadata,
//! and timm-format F32 weights written atomically. Every error names the file.
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use ::safetensors::tensor::TensorView;
use ::safetensors::{Dtype, SafeTensors};

use super::{read_up_to, write_atomic};
use crate::error::{Error, Result};

fn corrupt(path: &Path, e: impl std::fmt::Debug) -> Error {
    Error::format(path, format!("not a valid safetensors file (truncated or corrupt?): {e:?}"))
}

/// Whether `n` values fill a tensor of `shape` exactly (false when the shape's size overflows).
pub(crate) fn fills(shape: &[usize], n: usize) -> bool {
    shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) == Some(n)
}

/// A safetensors file read whole, its header checked.
pub(crate) struct File {
    path: PathBuf,
    bytes: Vec<u8>,
    /// Bytes of the JSON header, which follows the 8-byte length.
    header_len: usize,
    metadata: HashMap<String, String>,
}

impl File {
    /// Reads `path`.
    ///
    /// # Errors
    /// `Io` (unreadable), `Format` (truncated or corrupt), naming the file.
    pub(crate) fn read(path: &Path) -> Result<File> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let (header_len, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| corrupt(path, e))?;
        let metadata = meta.metadata().clone().unwrap_or_default();
        Ok(File { path: path.to_path_buf(), bytes, header_len, metadata })
    }

    /// A `__metadata__` value.
    pub(crate) fn metadata(&self, key: &str) -> Option<&String> {
        self.metadata.get(key)
    }

    /// The data section: every tensor's bytes, after the header.
    pub(crate) fn data(&self) -> &[u8] {
        &self.bytes[8 + self.header_len..]
    }

    /// The tensors, as views into the file's bytes.
    ///
    /// # Errors
    /// `Format` naming the file (not reached: [`File::read`] checked the header).
    pub(crate) fn tensors(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.bytes).map_err(|e| corrupt(&self.path, e))
    }
}

/// Tensor names of a safetensors file, from its header only (the data is not read).
///
/// # Errors
/// `Io` (unreadable), `Format` (no or a bad header), naming the file.
pub(crate) fn header_names(path: &Path) -> Result<Vec<String>> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut n8 = [0u8; 8];
    if read_up_to(&mut f, &mut n8).map_err(|e| Error::io(path, e))? < 8 {
        return Err(Error::format(path, "not a safetensors file: shorter than its 8-byte header length"));
    }
    let n = u64::from_le_bytes(n8);
    if n > len.saturating_sub(8) || n > 100 << 20 {
        return Err(Error::format(path, format!("not a safetensors file: header length {n} for a {len}-byte file")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
    let v: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| Error::format(path, format!("not a safetensors file: header is not JSON ({e})")))?;
    let obj =
        v.as_object().ok_or_else(|| Error::format(path, "not a safetensors file: header is not a JSON object"))?;
    Ok(obj.keys().filter(|k| *k != "__metadata__").cloned().collect())
}

fn le_f32(raw: &[u8]) -> Vec<f32> {
    raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn expect_dtype(path: &Path, name: &str, v: &TensorView<'_>, want: Dtype) -> Result<()> {
    if v.dtype() != want {
        return Err(Error::format(path, format!("tensor '{name}' has dtype {:?}, expected {want:?}", v.dtype())));
    }
    Ok(())
}

/// The values of an F32 tensor (checkpoints and exports store nothing else, so resume is exact).
///
/// # Errors
/// `Format` naming the file and the tensor for another dtype.
pub(crate) fn f32_values(path: &Path, name: &str, v: &TensorView<'_>) -> Result<Vec<f32>> {
    expect_dtype(path, name, v, Dtype::F32)?;
    Ok(le_f32(v.data()))
}

/// The values of an F32, F16 or BF16 tensor as f32 (the half types widen exactly): checkpoints of others.
///
/// # Errors
/// `Format` naming the file and the tensor for another dtype.
pub(crate) fn float_values(path: &Path, name: &str, v: &TensorView<'_>) -> Result<Vec<f32>> {
    let raw = v.data();
    Ok(match v.dtype() {
        Dtype::F32 => le_f32(raw),
        Dtype::F16 => raw.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::BF16 => raw.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        other => {
            return Err(Error::format(
                path,
                format!("tensor '{name}' has dtype {other:?}; only F32, F16 and BF16 are supported"),
            ))
        }
    })
}

/// The values of a U32 tensor (sparse-delta indices).
///
/// # Errors
/// `Format` naming the file and the tensor for another dtype.
pub(crate) fn u32_values(path: &Path, name: &str, v: &TensorView<'_>) -> Result<Vec<u32>> {
    expect_dtype(path, name, v, Dtype::U32)?;
    Ok(v.data().chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

/// The values of an I64 tensor (the golden cases' labels).
///
/// # Errors
/// `Format` naming the file and the tensor for another dtype.
pub(crate) fn i64_values(path: &Path, name: &str, v: &TensorView<'_>) -> Result<Vec<i64>> {
    expect_dtype(path, name, v, Dtype::I64)?;
    Ok(v.data().chunks_exact(8).map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])).collect())
}

/// The bytes of a U8 tensor (the golden cases' bit-packed trajectory masks).
///
/// # Errors
/// `Format` naming the file and the tensor for another dtype.
pub(crate) fn u8_values(path: &Path, name: &str, v: &TensorView<'_>) -> Result<Vec<u8>> {
    expect_dtype(path, name, v, Dtype::U8)?;
    Ok(v.data().to_vec())
}

/// One tensor to encode: dtype, shape and little-endian bytes (borrowed from the values on a
/// little-endian host, so a backbone is not copied to be written).
pub(crate) struct RawTensor<'a> {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Cow<'a, [u8]>,
}

/// The little-endian bytes of `data`: its own memory on a little-endian host (no copy), byte-swapped otherwise.
fn le_bytes<T: bytemuck::Pod>(data: &[T]) -> Cow<'_, [u8]> {
    let raw: &[u8] = bytemuck::cast_slice(data);
    if cfg!(target_endian = "little") {
        Cow::Borrowed(raw)
    } else {
        Cow::Owned(raw.chunks_exact(std::mem::size_of::<T>()).flat_map(|c| c.iter().rev().copied()).collect())
    }
}

impl<'a> RawTensor<'a> {
    pub(crate) fn f32(shape: Vec<usize>, data: &'a [f32]) -> RawTensor<'a> {
        RawTensor { dtype: Dtype::F32, shape, bytes: le_bytes(data) }
    }

    pub(crate) fn u32(shape: Vec<usize>, data: &'a [u32]) -> RawTensor<'a> {
        RawTensor { dtype: Dtype::U32, shape, bytes: le_bytes(data) }
    }

    /// The same tensor with its own copy of the bytes (for values that do not outlive the encoding).
    pub(crate) fn into_owned(self) -> RawTensor<'static> {
        RawTensor { dtype: self.dtype, shape: self.shape, bytes: Cow::Owned(self.bytes.into_owned()) }
    }

    /// The encoded values, as they will stand in the file's data section.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// Encodes tensors and string metadata as the bytes of a safetensors file; `what` is the file named in errors.
///
/// # Errors
/// `Invalid { option: "tensor" }` naming a tensor whose bytes do not fill its shape; `Format` when the
/// encoder fails.
pub(crate) fn serialize(
    tensors: &BTreeMap<String, RawTensor<'_>>,
    meta: HashMap<String, String>,
    what: &Path,
) -> Result<Vec<u8>> {
    let mut views = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let v = TensorView::new(t.dtype, t.shape.clone(), &t.bytes)
            .map_err(|e| Error::invalid("tensor", format!("'{name}': {e:?}")))?;
        views.push((name.as_str(), v));
    }
    ::safetensors::serialize(views, &Some(meta)).map_err(|e| Error::format(what, format!("cannot serialise: {e:?}")))
}

/// Writes weights in timm names as safetensors (F32, metadata `format: pt`), atomically (a temporary file,
/// fsync, rename): on any error `path` is untouched and no temporary is left.
///
/// # Errors
/// `Invalid { option: "tensor" }` naming a tensor whose values do not fill its shape; `Io` naming the path
/// that could not be written.
pub fn write_safetensors(path: &Path, tensors: &BTreeMap<String, (Vec<usize>, Vec<f32>)>) -> Result<()> {
    let mut raw = BTreeMap::new();
    for (name, (shape, data)) in tensors {
        if !fills(shape, data.len()) {
            return Err(Error::invalid("tensor", format!("'{name}' has {} values for shape {shape:?}", data.len())));
        }
        raw.insert(name.clone(), RawTensor::f32(shape.clone(), data));
    }
    let bytes = serialize(&raw, HashMap::from([("format".to_string(), "pt".to_string())]), path)?;
    drop(raw);
    write_atomic(path, &bytes)
}
