//! Replicas with no shared disk: blobs in an S3-compatible store (moto's server, see
//! common::s3), each replica with its own cache, on one PostgreSQL. Uploads land in the store,
//! a replica that never saw a file serves it (Range too), a tiny cache evicts, deleting a model
//! deletes its objects; and the throughput of the store against the local directory.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::cluster::*;
use common::process::{self, free_port, ServerProcess};
use serde_json::json;

#[test]
fn replicas_without_a_shared_disk_keep_blobs_in_an_s3_compatible_store() {
    let cluster = Cluster::on_s3();
    let api1 = cluster.start("api", None);
    // The second API replica may keep one blob at a time: what it serves comes from the store.
    let api2 = cluster.start_with("api", None, &[("QUANTD_CACHE_MAX_BYTES", "1")]);
    let api2_cache = cluster.data.path().join("replica-1");
    let api2_cache = api2_cache.as_path();
    let worker = cluster.start("worker", None);
    let ready = get(&api2, "/ready");
    assert_eq!(ready["store"], "ok");
    assert_eq!(ready["store_location"], cluster.storage_url().unwrap());

    let model = tempfile::tempdir().unwrap();
    common::tiny::write_model(model.path());
    curl_upload(&api1, model.path(), "tiny");
    assert_eq!(
        cluster.objects(),
        referenced_digests(&api1),
        "the upload is in the store"
    );

    let (status, submitted) = post(
        &api1,
        "/v1/jobs",
        &json!({"model": "tiny", "method": "gguf", "params": {"type": "Q8_0"}}),
    );
    assert_eq!(status, 202, "{submitted}");
    let id = submitted["id"].as_str().unwrap();
    let done = wait_terminal(&api2, id, Duration::from_secs(120));
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(
        cluster.objects(),
        referenced_digests(&api1),
        "the output too"
    );

    // The other API replica, whose disk never saw the variant, serves it from the store.
    let out = done["output_model"].as_str().unwrap();
    let response = client()
        .get(format!(
            "{}/v1/models/{out}/artifacts/tiny-q8_0.gguf",
            api2.base
        ))
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    let digest = response.headers()["x-digest"].to_str().unwrap().to_string();
    let bytes = response.bytes().unwrap();
    let file = api2_cache.join("downloaded.gguf");
    std::fs::write(&file, &bytes).unwrap();
    assert_eq!(
        format!("sha256:{}", hex_sha256(&bytes)),
        digest,
        "the bytes the digest names"
    );
    assert!(gguf_tensor_names(&file).contains("blk.0.attn_q.weight"));
    std::fs::remove_file(&file).unwrap();
    let ranged = client()
        .get(format!(
            "{}/v1/models/{out}/artifacts/tiny-q8_0.gguf",
            api2.base
        ))
        .header("range", "bytes=0-3")
        .send()
        .unwrap();
    assert_eq!(ranged.status(), 206);
    assert_eq!(&ranged.bytes().unwrap()[..], b"GGUF");
    let manifest = client()
        .get(format!(
            "{}/v1/models/{out}/artifacts/manifest.json",
            api2.base
        ))
        .send()
        .unwrap();
    assert_eq!(manifest.status(), 200);
    assert_eq!(
        blob_files(api2_cache).len(),
        1,
        "a cache of 1 byte keeps only the file just used"
    );

    // Deleting the variant deletes its objects; the base model's stay.
    let r = client()
        .delete(format!("{}/v1/models/{out}", api2.base))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(cluster.objects(), referenced_digests(&api1));
    assert_eq!(cluster.objects().len(), 4, "the base model's four files");
    for p in [api1, api2, worker] {
        stop(p);
    }
}

fn hex_sha256(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Upload and download throughput of the SmolLM2 checkpoint (270 MB of f16 weights) through a
/// replica on the local directory and through replicas on the S3-compatible store, same run:
/// the README's store numbers come from here. The download asks a replica whose cache is
/// empty, so its bytes come from the store.
#[test]
fn upload_and_download_throughput_local_directory_against_the_object_store() {
    let weights = smol_dir().join("model.safetensors");
    let size = std::fs::metadata(&weights).unwrap().len() as f64;
    let mib_s = |d: Duration| size / d.as_secs_f64() / (1 << 20) as f64;
    let download = |s: &ServerProcess| {
        let began = Instant::now();
        let r = client()
            .get(format!(
                "{}/v1/models/smol/artifacts/model.safetensors",
                s.base
            ))
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        let bytes = r.bytes().unwrap();
        assert_eq!(bytes.len() as f64, size);
        began.elapsed()
    };

    let data = tempfile::tempdir().unwrap();
    let local = process::start(data.path(), free_port(), &[], Stdio::null(), Stdio::null());
    let began = Instant::now();
    curl_upload(&local, &smol_dir(), "smol");
    let local_up = began.elapsed();
    let local_down = download(&local);
    stop(local);

    let cluster = Cluster::on_s3();
    let api1 = cluster.start("api", None);
    let api2 = cluster.start("api", None);
    let began = Instant::now();
    curl_upload(&api1, &smol_dir(), "smol");
    let s3_up = began.elapsed();
    let s3_down = download(&api2);
    let cached_down = download(&api2);
    println!(
        "SmolLM2 f16 weights ({:.0} MiB): upload local {:.0} MiB/s, S3 (moto) {:.0} MiB/s; \
         download local {:.0} MiB/s, S3 into an empty cache {:.0} MiB/s, then from the cache \
         {:.0} MiB/s",
        size / (1 << 20) as f64,
        mib_s(local_up),
        mib_s(s3_up),
        mib_s(local_down),
        mib_s(s3_down),
        mib_s(cached_down)
    );
    for p in [api1, api2] {
        stop(p);
    }
}

/// A replica whose bucket does not exist (or whose store is down) is not ready, and says why.
#[test]
fn a_missing_bucket_makes_the_replica_not_ready() {
    let s3 = common::s3::S3Server::start();
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_quantd"))
        .arg("serve")
        .env("QUANTD_DATA_DIR", data.path())
        .env("QUANTD_SERVER__PORT", port.to_string())
        .env("QUANTD_STORAGE_URL", "s3://no-such-bucket/x")
        .envs(s3.env())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ready = wait_until("an answer from /ready", Duration::from_secs(30), || {
        let r = reqwest::blocking::get(format!("http://127.0.0.1:{port}/ready")).ok()?;
        Some(serde_json::json!({"status": r.status().as_u16(), "body": r.text().unwrap()}))
    });
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(ready["status"], 503, "{ready}");
    assert!(
        ready["body"]
            .as_str()
            .unwrap()
            .contains("store unreachable"),
        "{ready}"
    );
}
