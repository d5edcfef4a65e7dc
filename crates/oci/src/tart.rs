//! Tart's image layout in an OCI manifest (tart-oci.md §3–5): which layers
//! an image has, where each disk layer goes, and the manifest vmapple
//! pushes. Everything read from a manifest is bounded and checked here, so
//! the pull code works on sizes it can trust to be sane.

use std::collections::HashMap;

use oci_spec::image::{Descriptor, ImageManifest, ImageManifestBuilder, MediaType};

use crate::digest::Digest;

pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.cirruslabs.tart.config.v1";
pub const DISK_V2_MEDIA_TYPE: &str = "application/vnd.cirruslabs.tart.disk.v2";
pub const DISK_V1_MEDIA_TYPE: &str = "application/vnd.cirruslabs.tart.disk.v1";
pub const NVRAM_MEDIA_TYPE: &str = "application/vnd.cirruslabs.tart.nvram.v1";

pub const UNCOMPRESSED_SIZE: &str = "org.cirruslabs.tart.uncompressed-size";
pub const UNCOMPRESSED_DIGEST: &str = "org.cirruslabs.tart.uncompressed-content-digest";
pub const UNCOMPRESSED_DISK_SIZE: &str = "org.cirruslabs.tart.uncompressed-disk-size";
pub const UPLOAD_TIME: &str = "org.cirruslabs.tart.upload-time";
pub const DISK_FORMAT_LABEL: &str = "org.cirruslabs.tart.disk.format";

/// Tart ≥ 2.11 cuts disks into chunks of this many bytes (the last one
/// shorter); older images have other sizes, which pull accepts.
pub const DISK_CHUNK: u64 = 512 << 20;

/// Bounds on what a registry may make us read or allocate.
pub const MAX_MANIFEST: u64 = 4 << 20;
pub const MAX_LAYERS: usize = 16384;
pub const MAX_CONFIG: u64 = 1 << 20;
pub const MAX_NVRAM: u64 = 256 << 20;
pub const MAX_DISK: u64 = 64 << 40;

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("the manifest is not valid JSON for an OCI image manifest: {0}")]
    Json(String),
    #[error(
        "the registry sent an image index (a multi-platform container image?), not a Tart VM image"
    )]
    Index,
    #[error("the manifest's media type is {0:?}, not {MANIFEST_MEDIA_TYPE:?}")]
    MediaType(String),
    #[error("not a Tart VM image: {0}")]
    NotTart(String),
    #[error("the image is in Tart's old disk format (disk.v1, Tart < 2.0), which vmapple does not read; push it again with a current Tart")]
    DiskV1,
    #[error("bad layer {index}: {message}")]
    Layer { index: usize, message: String },
}

/// A blob as a descriptor names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blob {
    pub digest: Digest,
    pub size: u64,
}

/// One disk layer and where its decoded bytes go in disk.img.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskLayer {
    pub blob: Blob,
    pub offset: u64,
    pub size: u64,
    /// sha256 of the decoded bytes.
    pub content: Digest,
}

impl DiskLayer {
    /// The most compressed bytes a layer of `size` decoded bytes can
    /// sensibly take: stored blocks plus framing, with room for encoders
    /// that cut small blocks.
    pub fn max_blob_size(size: u64) -> u64 {
        size.saturating_mul(2).saturating_add(4096)
    }
}

/// A Tart image as vmapple reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TartImage {
    pub config: Blob,
    pub disks: Vec<DiskLayer>,
    pub nvram: Blob,
    /// Sum of the disk layers' decoded sizes: disk.img's length.
    pub disk_size: u64,
}

fn blob_of(d: &Descriptor, index: usize) -> Result<Blob, LayoutError> {
    let digest = d
        .digest()
        .to_string()
        .parse::<Digest>()
        .map_err(|e| LayoutError::Layer {
            index,
            message: e.to_string(),
        })?;
    Ok(Blob {
        digest,
        size: d.size(),
    })
}

/// Parses and checks a Tart manifest: one config layer, one NVRAM layer,
/// at least one disk.v2 layer with both annotations; other layer types are
/// ignored, as Tart does.
pub fn parse_manifest(bytes: &[u8]) -> Result<TartImage, LayoutError> {
    let probe: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| LayoutError::Json(e.to_string()))?;
    match probe.get("mediaType").and_then(|m| m.as_str()) {
        Some(INDEX_MEDIA_TYPE) => return Err(LayoutError::Index),
        Some(MANIFEST_MEDIA_TYPE) | None => {}
        Some(other) => return Err(LayoutError::MediaType(other.chars().take(200).collect())),
    }
    if probe.get("manifests").is_some() {
        return Err(LayoutError::Index);
    }
    let manifest: ImageManifest =
        serde_json::from_value(probe).map_err(|e| LayoutError::Json(e.to_string()))?;
    if manifest.schema_version() != 2 {
        return Err(LayoutError::Json(format!(
            "schemaVersion {} (expected 2)",
            manifest.schema_version()
        )));
    }
    let layers = manifest.layers();
    if layers.len() > MAX_LAYERS {
        return Err(LayoutError::NotTart(format!(
            "{} layers, more than the {MAX_LAYERS} accepted",
            layers.len()
        )));
    }
    let mut config = None;
    let mut nvram = None;
    let mut disks = Vec::new();
    let mut offset: u64 = 0;
    for (index, layer) in layers.iter().enumerate() {
        let bad = |message: String| LayoutError::Layer { index, message };
        match layer.media_type().as_ref() {
            CONFIG_MEDIA_TYPE => {
                let b = blob_of(layer, index)?;
                if b.size > MAX_CONFIG {
                    return Err(bad(format!(
                        "a config of {} bytes (at most {MAX_CONFIG})",
                        b.size
                    )));
                }
                if config.replace(b).is_some() {
                    return Err(LayoutError::NotTart("more than one config layer".into()));
                }
            }
            NVRAM_MEDIA_TYPE => {
                let b = blob_of(layer, index)?;
                if b.size > MAX_NVRAM {
                    return Err(bad(format!(
                        "an NVRAM of {} bytes (at most {MAX_NVRAM})",
                        b.size
                    )));
                }
                if nvram.replace(b).is_some() {
                    return Err(LayoutError::NotTart("more than one NVRAM layer".into()));
                }
            }
            DISK_V1_MEDIA_TYPE => return Err(LayoutError::DiskV1),
            DISK_V2_MEDIA_TYPE => {
                let blob = blob_of(layer, index)?;
                let ann = layer.annotations().as_ref();
                let get = |key: &str| ann.and_then(|a| a.get(key));
                let size = get(UNCOMPRESSED_SIZE)
                    .ok_or_else(|| bad(format!("no {UNCOMPRESSED_SIZE} annotation")))?
                    .parse::<u64>()
                    .map_err(|_| bad(format!("{UNCOMPRESSED_SIZE} is not a byte count")))?;
                let content = get(UNCOMPRESSED_DIGEST)
                    .ok_or_else(|| bad(format!("no {UNCOMPRESSED_DIGEST} annotation")))?
                    .parse::<Digest>()
                    .map_err(|e| bad(e.to_string()))?;
                if blob.size > DiskLayer::max_blob_size(size) {
                    return Err(bad(format!(
                        "{} compressed bytes for {size} decoded bytes",
                        blob.size
                    )));
                }
                let end = offset
                    .checked_add(size)
                    .filter(|&e| e <= MAX_DISK)
                    .ok_or_else(|| {
                        LayoutError::NotTart(format!(
                            "the disk layers add up to more than {MAX_DISK} bytes"
                        ))
                    })?;
                disks.push(DiskLayer {
                    blob,
                    offset,
                    size,
                    content,
                });
                offset = end;
            }
            _ => {}
        }
    }
    let config = config.ok_or_else(|| LayoutError::NotTart("no config layer".into()))?;
    let nvram = nvram.ok_or_else(|| LayoutError::NotTart("no NVRAM layer".into()))?;
    if disks.is_empty() {
        return Err(LayoutError::NotTart("no disk layer".into()));
    }
    Ok(TartImage {
        config,
        disks,
        nvram,
        disk_size: offset,
    })
}

/// The OCI config blob Tart pushes beside its layers (for registries that
/// want one): compact JSON, keys sorted.
pub fn stub_config(arch: &str, os: &str, labels: &[(String, String)]) -> Vec<u8> {
    let mut l: std::collections::BTreeMap<&str, &str> = labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    l.entry(DISK_FORMAT_LABEL).or_insert("raw");
    let v = serde_json::json!({
        "architecture": arch,
        "config": { "Labels": l },
        "os": os,
    });
    // serde_json's map is ordered by key, so this is sorted.
    serde_json::to_vec(&v).unwrap_or_default()
}

fn descriptor(media_type: &str, blob: Blob) -> Descriptor {
    let digest: oci_spec::image::Digest = blob
        .digest
        .to_string()
        .parse()
        .expect("a sha256 digest is a valid OCI digest");
    let mut d = Descriptor::new(MediaType::from(media_type), blob.size, digest);
    d.set_annotations(Some(HashMap::new()));
    d
}

/// What [`build_manifest`] writes.
pub struct ManifestParts<'a> {
    pub stub_config: Blob,
    pub config: Blob,
    pub disks: &'a [DiskLayer],
    pub nvram: Blob,
    pub disk_size: u64,
    /// RFC 3339 time, e.g. `2026-01-02T03:04:05Z`.
    pub upload_time: Option<String>,
}

/// The manifest of an image in Tart's layout, as compact JSON with sorted
/// keys (what Tart writes).
pub fn build_manifest(parts: &ManifestParts) -> Vec<u8> {
    let mut layers = vec![descriptor(CONFIG_MEDIA_TYPE, parts.config)];
    for d in parts.disks {
        let mut desc = descriptor(DISK_V2_MEDIA_TYPE, d.blob);
        desc.set_annotations(Some(HashMap::from([
            (UNCOMPRESSED_SIZE.to_string(), d.size.to_string()),
            (UNCOMPRESSED_DIGEST.to_string(), d.content.to_string()),
        ])));
        layers.push(desc);
    }
    layers.push(descriptor(NVRAM_MEDIA_TYPE, parts.nvram));
    let mut annotations = HashMap::from([(
        UNCOMPRESSED_DISK_SIZE.to_string(),
        parts.disk_size.to_string(),
    )]);
    if let Some(t) = &parts.upload_time {
        annotations.insert(UPLOAD_TIME.to_string(), t.clone());
    }
    let mut config = descriptor(
        "application/vnd.oci.image.config.v1+json",
        parts.stub_config,
    );
    config.set_annotations(None);
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(config)
        .layers(layers)
        .annotations(annotations)
        .build()
        .expect("every required manifest field is set");
    // Through serde_json::Value, whose maps are sorted, for stable bytes.
    let value = serde_json::to_value(&manifest).unwrap_or_default();
    serde_json::to_vec(&value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(n: u8, size: u64) -> Blob {
        Blob {
            digest: Digest::of(&[n]),
            size,
        }
    }

    fn sample() -> Vec<u8> {
        let disks = [
            DiskLayer {
                blob: blob(1, 100),
                offset: 0,
                size: DISK_CHUNK,
                content: Digest::of(b"a"),
            },
            DiskLayer {
                blob: blob(2, 10),
                offset: DISK_CHUNK,
                size: 4096,
                content: Digest::of(b"b"),
            },
        ];
        build_manifest(&ManifestParts {
            stub_config: blob(3, 99),
            config: blob(4, 200),
            disks: &disks,
            nvram: blob(5, 65536),
            disk_size: DISK_CHUNK + 4096,
            upload_time: Some("2026-01-02T03:04:05Z".into()),
        })
    }

    #[test]
    fn a_built_manifest_has_tarts_shape_and_parses_back() {
        let bytes = sample();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["schemaVersion"], 2);
        assert_eq!(v["mediaType"], MANIFEST_MEDIA_TYPE);
        let types: Vec<&str> = v["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["mediaType"].as_str().unwrap())
            .collect();
        assert_eq!(
            types,
            [
                CONFIG_MEDIA_TYPE,
                DISK_V2_MEDIA_TYPE,
                DISK_V2_MEDIA_TYPE,
                NVRAM_MEDIA_TYPE
            ]
        );
        assert_eq!(
            v["layers"][1]["annotations"][UNCOMPRESSED_SIZE],
            "536870912"
        );
        assert_eq!(
            v["annotations"][UNCOMPRESSED_DISK_SIZE],
            (DISK_CHUNK + 4096).to_string()
        );
        let image = parse_manifest(&bytes).unwrap();
        assert_eq!(image.disks.len(), 2);
        assert_eq!(image.disks[1].offset, DISK_CHUNK);
        assert_eq!(image.disk_size, DISK_CHUNK + 4096);
        assert_eq!(image.nvram, blob(5, 65536));
        assert_eq!(image.config, blob(4, 200));
    }

    fn edit(f: impl FnOnce(&mut serde_json::Value)) -> Result<TartImage, LayoutError> {
        let mut v: serde_json::Value = serde_json::from_slice(&sample()).unwrap();
        f(&mut v);
        parse_manifest(&serde_json::to_vec(&v).unwrap())
    }

    #[test]
    fn manifests_that_are_not_sane_tart_images_are_refused() {
        type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;
        let cases: Vec<(Edit, &str)> = vec![
            (
                Box::new(|v| v["mediaType"] = INDEX_MEDIA_TYPE.into()),
                "image index",
            ),
            (
                Box::new(|v| v["mediaType"] = "text/plain".into()),
                "media type",
            ),
            (
                Box::new(|v| v["layers"][3]["mediaType"] = "x/y".into()),
                "no NVRAM layer",
            ),
            (
                Box::new(|v| v["layers"][1]["mediaType"] = DISK_V1_MEDIA_TYPE.into()),
                "old disk format",
            ),
            (
                Box::new(|v| {
                    v["layers"][1]["annotations"]
                        .as_object_mut()
                        .unwrap()
                        .remove(UNCOMPRESSED_SIZE);
                }),
                "no org.cirruslabs.tart.uncompressed-size",
            ),
            (
                Box::new(|v| v["layers"][1]["annotations"][UNCOMPRESSED_SIZE] = "-1".into()),
                "not a byte count",
            ),
            (
                Box::new(|v| {
                    v["layers"][1]["annotations"][UNCOMPRESSED_SIZE] = u64::MAX.to_string().into()
                }),
                "add up to more than",
            ),
            (
                Box::new(|v| v["layers"][2]["size"] = 1_000_000_000u64.into()),
                "compressed bytes for 4096",
            ),
            (
                Box::new(|v| v["layers"][3]["size"] = (1u64 << 40).into()),
                "an NVRAM of",
            ),
            (
                Box::new(|v| {
                    let l = v["layers"][1].clone();
                    let arr = v["layers"].as_array_mut().unwrap();
                    arr.extend(std::iter::repeat_n(l, MAX_LAYERS));
                }),
                "layers, more than",
            ),
            (
                Box::new(|v| v["layers"][0]["digest"] = "md5:abc".into()),
                "is not a sha256 digest",
            ),
        ];
        for (f, want) in cases {
            let e = edit(f).unwrap_err().to_string();
            assert!(e.contains(want), "{want:?} not in {e:?}");
        }
        assert!(parse_manifest(b"{\"manifests\":[]}")
            .unwrap_err()
            .to_string()
            .contains("image index"));
        assert!(parse_manifest(b"<html>").is_err());
    }

    #[test]
    fn the_stub_config_carries_the_disk_format_label() {
        let c = stub_config("arm64", "darwin", &[("a".into(), "b".into())]);
        assert_eq!(
            std::str::from_utf8(&c).unwrap(),
            r#"{"architecture":"arm64","config":{"Labels":{"a":"b","org.cirruslabs.tart.disk.format":"raw"}},"os":"darwin"}"#
        );
    }
}
