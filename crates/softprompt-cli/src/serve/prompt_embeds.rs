//! `prompt_embeds` on `/v1/completions`: a tensor `[tokens, hidden]` sent as vLLM's clients
//! send it, the base64 of what `torch.save(tensor, buffer)` writes (PyTorch's zip format: a
//! pickle naming the storage, shape and strides, and the storage's bytes). The pickle is read by
//! candle's unpickler (`candle_core::pickle`), after a scan that bounds what it may build; the
//! tensor is checked (float32, float16 or bfloat16, 2-D, the model's hidden size, at most the
//! tokens allowed, every value finite) and returned as f32. Every refusal says what is wrong.

use base64::Engine as _;
use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Tensor};
use std::io::{Cursor, Read};

/// Largest decoded `torch.save` file (8 MiB: 3,600 tokens of a 576-wide f32 model).
pub const MAX_EMBEDS_BYTES: usize = 8 << 20;

/// Largest pickle in the file (`torch.save` of one tensor writes about 160 bytes).
const MAX_PICKLE_BYTES: usize = 4096;

/// Most memo reads in the pickle (each copies an object: bounded, so that a crafted pickle
/// cannot grow without end).
const MAX_MEMO_GETS: usize = 16;

/// What the tensor must fit.
#[derive(Debug, Clone, Copy)]
pub struct Expect {
    /// The model's hidden size (the tensor's second dimension).
    pub hidden: usize,
    /// Most rows (tokens).
    pub max_tokens: usize,
}

/// Decodes the base64 text `b64` of a `torch.save` file into an f32 tensor `[tokens, hidden]`;
/// the error says what is wrong (without the field's name, which the caller adds).
pub fn decode(b64: &str, expect: Expect) -> Result<Tensor, String> {
    let limit = MAX_EMBEDS_BYTES.div_ceil(3) * 4;
    if b64.len() > limit {
        return Err(format!(
            "is {} bytes of base64; at most {limit} are read ({MAX_EMBEDS_BYTES} bytes decoded)",
            b64.len()
        ));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|e| format!("is not base64: {e}"))?;
    let mut file = TorchFile::open(bytes)?;
    let info = file.tensor_info()?;
    let (rows, cols, strides) = matrix_shape(&info, expect)?;
    let storage = file.storage(&info)?;
    let offset = info.layout.start_offset() / info.dtype.size_in_bytes();
    let last = offset
        .checked_add((rows - 1).saturating_mul(strides[0]))
        .and_then(|x| x.checked_add((cols - 1).saturating_mul(strides[1])))
        .filter(|&x| x < storage.len());
    if last.is_none() {
        return Err(format!(
            "has shape [{rows}, {cols}] with strides {strides:?} from offset {offset}, which reaches past its storage of {} values",
            storage.len()
        ));
    }
    let mut values = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for c in 0..cols {
            let v = storage[offset + r * strides[0] + c * strides[1]];
            if !v.is_finite() {
                return Err(format!("holds {v} at row {r}, column {c}: every value must be finite"));
            }
            values.push(v);
        }
    }
    Tensor::from_vec(values, (rows, cols), &Device::Cpu).map_err(|e| format!("{e}"))
}

/// The rows, columns and strides of the tensor, checked: float32, float16 or bfloat16, 2-D
/// (or 3-D with a batch of one, dropped as vLLM does), `expect.hidden` columns, 1 to
/// `expect.max_tokens` rows.
fn matrix_shape(info: &candle_core::pickle::TensorInfo, expect: Expect) -> Result<(usize, usize, [usize; 2]), String> {
    if !matches!(info.dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(format!(
            "has dtype {:?}; prompt_embeds must be float32, float16 or bfloat16",
            info.dtype
        ));
    }
    let mut dims = info.layout.dims().to_vec();
    let mut strides = info.layout.stride().to_vec();
    if strides.len() != dims.len() {
        return Err(format!("has shape {dims:?} but strides {strides:?}"));
    }
    if dims.len() == 3 && dims[0] == 1 {
        dims.remove(0);
        strides.remove(0);
    }
    let &[rows, cols] = dims.as_slice() else {
        return Err(format!(
            "has shape {:?}; expected 2-D [tokens, hidden]",
            info.layout.dims()
        ));
    };
    if cols != expect.hidden {
        return Err(format!(
            "has shape [{rows}, {cols}]: hidden size {cols}, the model's is {}",
            expect.hidden
        ));
    }
    if rows == 0 {
        return Err("has no rows: at least one embedding is needed".into());
    }
    if rows > expect.max_tokens {
        return Err(format!("has {rows} rows; at most {} are served", expect.max_tokens));
    }
    Ok((rows, cols, [strides[0], strides[1]]))
}

/// A `torch.save` file in memory: a zip archive.
struct TorchFile {
    zip: zip::ZipArchive<Cursor<Vec<u8>>>,
}

impl TorchFile {
    fn open(bytes: Vec<u8>) -> Result<Self, String> {
        let zip = zip::ZipArchive::new(Cursor::new(bytes))
            .map_err(|e| format!("is not a file written by torch.save (a zip archive): {e}"))?;
        Ok(Self { zip })
    }

    /// The bytes of entry `name`, refused past `limit` bytes.
    fn entry(&mut self, name: &str, limit: usize) -> Result<Vec<u8>, String> {
        let entry = self
            .zip
            .by_name(name)
            .map_err(|e| format!("is a zip archive without a readable entry `{name}`: {e}"))?;
        if entry.size() > limit as u64 {
            return Err(format!(
                "has an archive entry `{name}` of {} bytes; at most {limit} are read",
                entry.size()
            ));
        }
        let mut out = Vec::with_capacity(entry.size() as usize);
        entry
            .take(limit as u64)
            .read_to_end(&mut out)
            .map_err(|e| format!("has an archive entry `{name}` that cannot be read: {e}"))?;
        Ok(out)
    }

    /// The pickled tensor's storage type, shape, strides and storage entry.
    fn tensor_info(&mut self) -> Result<candle_core::pickle::TensorInfo, String> {
        let names: Vec<String> = self.zip.file_names().map(str::to_string).collect();
        let pickles: Vec<&String> = names.iter().filter(|n| n.ends_with("/data.pkl")).collect();
        let [pickle_name] = pickles.as_slice() else {
            return Err(format!(
                "is not a file written by torch.save: {} `data.pkl` entries, expected one",
                pickles.len()
            ));
        };
        let dir = pickle_name.trim_end_matches("data.pkl");
        if names.iter().any(|n| *n == format!("{dir}byteorder")) {
            let order = self.entry(&format!("{dir}byteorder"), 16)?;
            if order != b"little" {
                return Err(format!(
                    "was written big-endian (byteorder `{}`); only little-endian files are read",
                    String::from_utf8_lossy(&order)
                ));
            }
        }
        let pickle = self.entry(pickle_name, MAX_PICKLE_BYTES)?;
        pickled_tensor(&pickle, std::path::Path::new(pickle_name.trim_end_matches(".pkl")))
    }

    /// The storage of `info` as f32 values (its whole storage; the tensor may view part of it).
    fn storage(&mut self, info: &candle_core::pickle::TensorInfo) -> Result<Vec<f32>, String> {
        let size = info.dtype.size_in_bytes();
        let need = info
            .storage_size
            .checked_mul(size)
            .filter(|&n| n <= MAX_EMBEDS_BYTES)
            .ok_or_else(|| {
                format!(
                    "has a storage of {} values, over {MAX_EMBEDS_BYTES} bytes",
                    info.storage_size
                )
            })?;
        let bytes = self.entry(&info.path, MAX_EMBEDS_BYTES)?;
        if bytes.len() < need {
            return Err(format!(
                "has a storage `{}` of {} bytes; {} values of {:?} need {need}",
                info.path,
                bytes.len(),
                info.storage_size,
                info.dtype
            ));
        }
        let tensor = Tensor::from_raw_buffer(&bytes[..need], info.dtype, &[info.storage_size], &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.to_vec1::<f32>());
        tensor.map_err(|e| format!("has a storage that cannot be read: {e}"))
    }
}

/// What a pickle that is not one plain tensor is told.
const NOT_A_TENSOR: &str = "does not hold a tensor (torch.save one torch.Tensor, not a dict, a list or a Parameter)";

/// Refuses an object that is not `torch._utils._rebuild_tensor_v2(storage, offset, size,
/// stride, ..)` with the storage a persistent id of five parts: the form `torch.save` writes
/// for one tensor, and the one candle's `into_tensor_info` reads (it indexes those parts).
fn check_tensor_object(object: &Object) -> Result<(), String> {
    let Object::Reduce { callable, args } = object else {
        return Err(NOT_A_TENSOR.into());
    };
    let rebuild = matches!(&**callable, Object::Class { module_name, class_name }
        if module_name == "torch._utils" && class_name == "_rebuild_tensor_v2");
    let storage_ok =
        |o: &Object| matches!(o, Object::PersistentLoad(id) if matches!(&**id, Object::Tuple(t) if t.len() >= 5));
    match &**args {
        Object::Tuple(a) if rebuild && a.len() >= 4 && storage_ok(&a[0]) => Ok(()),
        _ => Err(NOT_A_TENSOR.into()),
    }
}

/// The tensor pickled in `pickle` (its storage entry named under `data_dir`), read by candle.
pub(super) fn pickled_tensor(
    pickle: &[u8],
    data_dir: &std::path::Path,
) -> Result<candle_core::pickle::TensorInfo, String> {
    let object = read_pickle(pickle)?;
    check_tensor_object(&object)?;
    match object.into_tensor_info(Object::Unicode("prompt_embeds".into()), data_dir) {
        Ok(Some(info)) => Ok(info),
        Ok(None) => Err(NOT_A_TENSOR.into()),
        Err(e) => Err(format!("does not hold a tensor that can be read: {e}")),
    }
}

/// The object pickled in `pickle`, read by candle's unpickler once [`scan_pickle`] passed it.
fn read_pickle(pickle: &[u8]) -> Result<Object, String> {
    scan_pickle(pickle).map_err(|e| format!("holds a pickle that is not a saved tensor: {e}"))?;
    let mut stack = Stack::empty();
    stack
        .read_loop(&mut &pickle[..])
        .map_err(|e| format!("holds a pickle that cannot be read: {e}"))?;
    stack
        .finalize()
        .map_err(|e| format!("holds a pickle that cannot be read: {e}"))
}

/// Walks the pickle's opcodes before candle's unpickler runs them: only the opcodes it knows,
/// each with its whole argument, a string no longer than what is left, integers of at most 8
/// bytes and at most [`MAX_MEMO_GETS`] memo reads.
fn scan_pickle(p: &[u8]) -> Result<(), String> {
    let mut i = 0;
    let mut gets = 0;
    let need = |i: usize, n: usize| -> Result<(), String> {
        match i.checked_add(n).is_some_and(|end| end <= p.len()) {
            true => Ok(()),
            false => Err(format!("it ends inside an argument at byte {i}")),
        }
    };
    while i < p.len() {
        let op = p[i];
        i += 1;
        let arg = match op {
            b'.' => return Ok(()),
            b')' | b'R' | b'(' | b't' | b'Q' | 0x85 | 0x86 | 0x87 | 0x88 | 0x89 | b'N' | b's' | b'u' | b'}' | b'd'
            | b'b' | 0x81 | b']' | b'a' | b'e' => 0,
            0x80 | b'K' | b'q' => 1,
            b'M' => 2,
            b'J' | b'r' => 4,
            b'G' => 8,
            b'h' | b'j' => {
                gets += 1;
                if gets > MAX_MEMO_GETS {
                    return Err(format!("more than {MAX_MEMO_GETS} memo reads"));
                }
                if op == b'h' {
                    1
                } else {
                    4
                }
            }
            b'X' => {
                need(i, 4)?;
                let len = u32::from_le_bytes([p[i], p[i + 1], p[i + 2], p[i + 3]]) as usize;
                4 + len
            }
            0x8a => {
                need(i, 1)?;
                let n = p[i] as usize;
                if n > 8 {
                    return Err(format!("an integer of {n} bytes at byte {i}"));
                }
                1 + n
            }
            b'c' => {
                let mut end = i;
                for _ in 0..2 {
                    end += p[end..]
                        .iter()
                        .position(|&b| b == b'\n')
                        .ok_or_else(|| format!("an unterminated name at byte {i}"))?
                        + 1;
                }
                end - i
            }
            other => return Err(format!("opcode 0x{other:02x} at byte {}", i - 1)),
        };
        need(i, arg)?;
        i += arg;
    }
    Err("it has no STOP opcode".into())
}
