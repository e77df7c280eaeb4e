//! Items named in a request (data URLs, base64, allowed files, allowed URLs)
//! turned into [`Item`] bytes, and the per-item limits checked before any
//! modality sees them.
//!
//! Only this layer reads files or the network for an item (the modalities get
//! bytes): a path is read only when the file it opens is a regular file
//! under `--allow-files DIR` (checked on the open handle, so no symlink swap
//! can race the check); a URL is fetched only with `--allow-urls`.

use std::io::Read;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use multitoken_core::{Item, ItemMedia};

use crate::config::{Limits, ServeConfig};
use crate::error::{Error, Result};

/// Where the item names its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ItemSource {
    /// `data:<mime>;base64,<data>` or bare base64.
    Base64(String),
    /// An http(s) URL.
    Url(String),
    /// A path, relative to the allowed directory.
    Path(String),
    /// Inline text (or compact JSON) that the modality parses itself.
    Text(String),
}

impl ItemSource {
    /// Classifies a string as a row would give it: a data URL, an http(s) URL,
    /// or a path.
    pub fn parse(text: &str) -> Self {
        let lower = text.get(..8).unwrap_or(text).to_ascii_lowercase();
        if lower.starts_with("data:") {
            ItemSource::Base64(text.to_string())
        } else if lower.starts_with("http://") || lower.starts_with("https://") {
            ItemSource::Url(text.to_string())
        } else {
            ItemSource::Path(text.to_string())
        }
    }
}

/// Reads one item's bytes. `what` names it in errors (e.g. `images[1]`).
pub fn resolve(source: &ItemSource, what: &str, config: &ServeConfig) -> Result<Item> {
    if let ItemSource::Text(text) = source {
        if text.is_empty() {
            return Err(Error::bad_param(what, format!("{what}: the item is empty")));
        }
        return Ok(Item::Text(text.clone()));
    }
    let bytes = match source {
        ItemSource::Text(_) => Vec::new(),
        ItemSource::Base64(text) => decode_base64(text, what)?,
        ItemSource::Url(url) => fetch_url(url, what, config)?,
        // `/generate` rows name paths and data alike as strings: bare base64 (as the
        // OpenAI route's `input_audio.data` takes it) is read as data unless it names
        // an allowed file.
        ItemSource::Path(path) if looks_like_base64(path) && !names_allowed_file(path, config) => {
            decode_base64(path, what)?
        }
        ItemSource::Path(path) => read_allowed_file(path, what, config)?,
    };
    if bytes.is_empty() {
        return Err(Error::bad_param(what, format!("{what}: the item is empty")));
    }
    Ok(Item::Bytes(bytes))
}

/// Decodes `data:...;base64,XXXX` or bare base64 (standard or URL-safe, padded or not).
pub fn decode_base64(text: &str, what: &str) -> Result<Vec<u8>> {
    let payload = if text.get(..5).is_some_and(|p| p.eq_ignore_ascii_case("data:")) {
        let Some((header, data)) = text.split_once(',') else {
            return Err(Error::bad_param(
                what,
                format!("{what}: a data URL needs a comma before its data"),
            ));
        };
        if !header.to_ascii_lowercase().ends_with(";base64") {
            return Err(Error::bad_param(
                what,
                format!("{what}: only base64 data URLs are read (`data:<type>;base64,...`)"),
            ));
        }
        data
    } else {
        text
    };
    let cleaned: String = payload.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let engines = [
        &base64::engine::general_purpose::STANDARD,
        &base64::engine::general_purpose::STANDARD_NO_PAD,
        &base64::engine::general_purpose::URL_SAFE,
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ];
    let mut first_error = None;
    for engine in engines {
        match engine.decode(cleaned.as_bytes()) {
            Ok(bytes) => return Ok(bytes),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    let reason = first_error.map(|e| e.to_string()).unwrap_or_default();
    Err(Error::bad_param(
        what,
        format!("{what}: invalid base64 data ({reason})"),
    ))
}

/// Whether `text` reads as bare base64 rather than a path: at least 64 characters,
/// all of base64's alphabets (standard or URL-safe, padding, line breaks) and no
/// `.`, which no file name with an extension lacks; the shortest media file is
/// longer than 48 bytes anyway.
pub fn looks_like_base64(text: &str) -> bool {
    text.len() >= 64
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'-' | b'_' | b'\n' | b'\r'))
}

/// Whether `path` is a file the server may read (`--allow-files`).
fn names_allowed_file(path: &str, config: &ServeConfig) -> bool {
    config.allow_files.as_deref().is_some_and(|root| allowed_path(root, Path::new(path)).is_some())
}

/// Reads `path` if it is a regular file under the allowed directory, at most
/// `--max-body-bytes` of it (a file item may be as large as an inline one).
///
/// The file is opened once and read from that handle; the check is made on
/// what was opened, not on a path that could change between a check and an
/// open (a directory swapped for a symlink to `/` mid-request). See
/// [`open_allowed_file`].
fn read_allowed_file(path: &str, what: &str, config: &ServeConfig) -> Result<Vec<u8>> {
    let Some(root) = &config.allow_files else {
        return Err(Error::bad_param(
            what,
            format!("{what}: local paths are not allowed on this server (it was started without --allow-files DIR); send the data as a base64 data URL"),
        ));
    };
    let outside = || Error::bad_param(what, format!("{what}: {path:?} is not a file under the allowed directory"));
    let file = open_allowed_file(root, Path::new(path)).ok_or_else(outside)?;
    let limit = config.limits.max_body_bytes as u64;
    let too_large = || {
        Error::bad_param(
            what,
            format!("{what}: {path:?} is larger than the limit of {limit} bytes (--max-body-bytes)"),
        )
    };
    if file.metadata().is_ok_and(|m| m.len() > limit) {
        return Err(too_large());
    }
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::bad_param(what, format!("{what}: cannot read {path:?}: {e}")))?;
    if bytes.len() as u64 > limit {
        return Err(too_large());
    }
    Ok(bytes)
}

/// Opens `path` (relative to `root`, or absolute) when the file opened is a
/// regular file inside `root`.
///
/// Race-free by construction: the file is opened first (non-blocking, so a
/// FIFO cannot hang the request), then the *opened* file is checked. Where
/// `/proc/self/fd` exists, its link names the opened file's real path, which
/// must lie under the canonical root; elsewhere the path is canonicalised
/// after the open and must be under the root *and* name the same file
/// (device and inode) as the handle. Whatever is swapped in between, the bytes
/// read come from the handle that passed the check. (A hard link inside the
/// root to a file outside it is that file's name inside the root, as it is for
/// any check; making one needs write access to the root.)
pub fn open_allowed_file(root: &Path, path: &Path) -> Option<std::fs::File> {
    let root = root.canonicalize().ok()?;
    let candidate = if path.is_absolute() {
        path.to_path_buf()
    } else {
        root.join(path)
    };
    let file = open_nonblocking(&candidate).ok()?;
    let meta = file.metadata().ok()?;
    if !meta.is_file() {
        return None;
    }
    if !opened_file_is_under(&file, &meta, &candidate, &root) {
        return None;
    }
    Some(file)
}

#[cfg(unix)]
fn open_nonblocking(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
}

#[cfg(not(unix))]
fn open_nonblocking(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::File::open(path)
}

#[cfg(unix)]
fn opened_file_is_under(file: &std::fs::File, meta: &std::fs::Metadata, candidate: &Path, root: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::io::AsRawFd;
    let proc_link = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    if let Ok(real) = std::fs::read_link(&proc_link) {
        return real.is_absolute() && real.starts_with(root);
    }
    let Ok(resolved) = candidate.canonicalize() else { return false };
    let Ok(named) = std::fs::metadata(&resolved) else { return false };
    resolved.starts_with(root) && named.dev() == meta.dev() && named.ino() == meta.ino()
}

#[cfg(not(unix))]
fn opened_file_is_under(_file: &std::fs::File, _meta: &std::fs::Metadata, candidate: &Path, root: &Path) -> bool {
    candidate.canonicalize().is_ok_and(|resolved| resolved.starts_with(root))
}

/// The canonical path of `path` (relative to `root`, or absolute) when it is a
/// regular file inside `root` after resolving `..` and symlinks. A check only
/// (it tells a path from bare base64); reading goes through [`open_allowed_file`].
pub fn allowed_path(root: &Path, path: &Path) -> Option<PathBuf> {
    let root = root.canonicalize().ok()?;
    let candidate = if path.is_absolute() {
        path.to_path_buf()
    } else {
        root.join(path)
    };
    let resolved = candidate.canonicalize().ok()?;
    (resolved.starts_with(&root) && resolved.is_file()).then_some(resolved)
}

/// Fetches an http(s) URL when `--allow-urls` is on, bounded by the body limit.
fn fetch_url(url: &str, what: &str, config: &ServeConfig) -> Result<Vec<u8>> {
    if !config.allow_urls {
        return Err(Error::bad_param(
            what,
            format!("{what}: URLs are not fetched by this server (it was started without --allow-urls); send the data as a base64 data URL"),
        ));
    }
    let limit = config.limits.max_body_bytes as u64;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(std::time::Duration::from_secs(30)))
        .build()
        .into();
    let response = agent
        .get(url)
        .call()
        .map_err(|e| Error::bad_param(what, format!("{what}: fetching {url}: {e}")))?;
    let mut bytes = Vec::new();
    response
        .into_body()
        .into_reader()
        .take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::bad_param(what, format!("{what}: reading {url}: {e}")))?;
    if bytes.len() as u64 > limit {
        return Err(Error::bad_param(
            what,
            format!("{what}: {url} is larger than the limit of {limit} bytes"),
        ));
    }
    Ok(bytes)
}

/// Checks an item of a modality whose items are `media`
/// ([`multitoken_core::Modality::media`]) against the limits that apply to
/// that media; only [`Item::Bytes`] (what [`resolve`] returns for files and
/// base64) are checked here.
pub fn check_limits(media: ItemMedia, item: &Item, what: &str, limits: &Limits) -> Result<()> {
    let Item::Bytes(bytes) = item else { return Ok(()) };
    match media {
        ItemMedia::Image => {
            let (w, h) = image_dimensions(bytes)
                .map_err(|e| Error::bad_param(what, format!("{what}: not a decodable image: {e}")))?;
            if u64::from(w) * u64::from(h) > limits.max_image_pixels {
                return Err(Error::bad_param(
                    what,
                    format!(
                        "{what}: the image is {w}x{h}, more than the limit of {} pixels",
                        limits.max_image_pixels
                    ),
                ));
            }
        }
        ItemMedia::Audio => {
            let seconds = audio_seconds(bytes)
                .map_err(|e| Error::bad_param(what, format!("{what}: not decodable audio: {e}")))?;
            if let Some(seconds) = seconds.filter(|&s| s > limits.max_audio_seconds) {
                return Err(Error::bad_param(
                    what,
                    format!(
                        "{what}: the audio lasts {seconds:.1} s, more than the limit of {} s",
                        limits.max_audio_seconds
                    ),
                ));
            }
        }
        _ => {}
    }
    Ok(())
}

/// Width and height from the image header, without decoding the pixels.
fn image_dimensions(bytes: &[u8]) -> std::result::Result<(u32, u32), String> {
    image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| e.to_string())?
        .into_dimensions()
        .map_err(|e| e.to_string())
}

/// The clip's duration from the container header (`None` when it does not say).
/// symphonia asserts on some headers (a WAV at 0 Hz): a panic is a bad header.
fn audio_seconds(bytes: &[u8]) -> std::result::Result<Option<f64>, String> {
    std::panic::catch_unwind(|| probe_audio_seconds(bytes))
        .unwrap_or_else(|_| Err("the audio header is malformed (the decoder refused it)".into()))
}

fn probe_audio_seconds(bytes: &[u8]) -> std::result::Result<Option<f64>, String> {
    use symphonia::core::formats::FormatOptions;
    use symphonia::core::io::MediaSourceStream;
    use symphonia::core::meta::MetadataOptions;
    use symphonia::core::probe::Hint;
    let source = MediaSourceStream::new(Box::new(std::io::Cursor::new(bytes.to_vec())), Default::default());
    let probed = symphonia::default::get_probe()
        .format(
            &Hint::new(),
            source,
            &FormatOptions::default(),
            &MetadataOptions::default(),
        )
        .map_err(|e| e.to_string())?;
    let Some(track) = probed.format.default_track() else {
        return Err("the file has no audio track".into());
    };
    let params = &track.codec_params;
    Ok(match (params.n_frames, params.sample_rate) {
        (Some(frames), Some(rate)) if rate > 0 => Some(frames as f64 / f64::from(rate)),
        _ => None,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn classifies_sources() {
        let cases = [
            (
                "data:image/png;base64,AAAA",
                ItemSource::Base64("data:image/png;base64,AAAA".into()),
            ),
            ("HTTPS://x.org/a.png", ItemSource::Url("HTTPS://x.org/a.png".into())),
            ("img/a.png", ItemSource::Path("img/a.png".into())),
        ];
        for (text, want) in cases {
            assert_eq!(ItemSource::parse(text), want, "{text}");
        }
    }

    #[test]
    fn bare_base64_is_told_from_paths() {
        // The first 60 bytes of a PNG.
        let png = "iVBORw0KGgoAAAANSUhEUgAAAA0AAAAVCAIAAAASDPPdAAADK0lEQVR4nAXBW1fadgAA8D///AOEcA0J";
        assert!(looks_like_base64(png));
        assert!(looks_like_base64("/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAAgGBgcGBQgHBwcJCQgKDBQNDAsLDBkSEw8UHR0"));
        for path in ["cat.png", "images/a/b/c.jpeg", "/abs/olute/path/without/a/dot", "a b"] {
            assert!(!looks_like_base64(path), "{path}");
        }
        let config = ServeConfig::default();
        let item = resolve(&ItemSource::Path(png.into()), "images[0]", &config).unwrap();
        assert!(matches!(item, Item::Bytes(bytes) if bytes.starts_with(b"\x89PNG")));
    }

    #[test]
    fn decodes_base64_variants_and_names_bad_data() {
        assert_eq!(decode_base64("data:text/plain;base64,aGk=", "x").unwrap(), b"hi");
        assert_eq!(decode_base64("aGk", "x").unwrap(), b"hi");
        let err = decode_base64("data:image/png;base64,@@@", "images[0]")
            .unwrap_err()
            .to_string();
        assert!(err.contains("images[0]") && err.contains("invalid base64"), "{err}");
        let err = decode_base64("data:text/plain,hi", "x").unwrap_err().to_string();
        assert!(err.contains("only base64"), "{err}");
    }

    #[test]
    fn audio_limits_name_the_item_and_documents_pass_to_their_modality() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/audio");
        let wav = Item::Bytes(std::fs::read(fixtures.join("speech16k.wav")).unwrap());
        let tight = Limits {
            max_audio_seconds: 0.01,
            ..Limits::default()
        };
        let err = check_limits(ItemMedia::Audio, &wav, "speech_audios[0]", &tight)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("speech_audios[0]: the audio lasts") && err.contains("limit of 0.01 s"),
            "{err}"
        );
        assert!(check_limits(ItemMedia::Audio, &wav, "a", &Limits::default()).is_ok());
        // A WAV at 0 Hz: symphonia's `TimeBase` assertion used to panic here (issue 23).
        let mut zero_rate = std::fs::read(fixtures.join("speech16k.wav")).unwrap();
        zero_rate[24..28].copy_from_slice(&0u32.to_le_bytes());
        let err = check_limits(ItemMedia::Audio, &Item::Bytes(zero_rate), "a", &tight).unwrap_err();
        assert!(err.to_string().contains("not decodable audio"), "{err}");
        let err = check_limits(ItemMedia::Audio, &Item::Bytes(b"not audio".to_vec()), "a", &tight)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not decodable audio"), "{err}");
        assert!(check_limits(ItemMedia::Document, &Item::Bytes(b"plain text".to_vec()), "d", &tight).is_ok());
    }
}
