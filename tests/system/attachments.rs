//! Attachments through the relay's blob store: picked offline and uploaded on reconnect, checked
//! (hash, size, type from content), thumbnailed, downloaded by the team and the widget customer of
//! that conversation only, sent by widget customers too, and kept across a relay restart.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use crewdesk::domain::{Author, ConversationId, MessageBody, Timestamp};
use std::time::Duration;
use system_tests::{Agent, BlobHash, TestRelay, eventually, png};

/// Starts a web-widget conversation in `team`; returns (session, conversation).
async fn widget_conversation(relay: &TestRelay, team: &str, name: &str) -> (String, ConversationId) {
    let r = reqwest::Client::new()
        .post(format!("{}/api/widget/{}/conversations", relay.url(), relay.widget_key(team)))
        .json(&serde_json::json!({ "name": name, "text": "I will send you a photo." }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    (v["session"].as_str().unwrap().to_owned(), ConversationId(v["conversation"].as_str().unwrap().to_owned()))
}

async fn get(url: String, token: Option<&str>) -> (u16, Vec<u8>, String) {
    let mut request = reqwest::Client::new().get(url);
    if let Some(t) = token {
        request = request.bearer_auth(t);
    }
    let r = request.send().await.unwrap();
    let status = r.status().as_u16();
    let kind = r.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    (status, r.bytes().await.unwrap().to_vec(), kind)
}

async fn put(
    relay: &TestRelay,
    token: &str,
    id: &ConversationId,
    hash: &str,
    mime: &str,
    body: Vec<u8>,
) -> (u16, String) {
    let r = reqwest::Client::new()
        .put(format!("{}/api/conversations/{}/blobs/{hash}", relay.url(), id.0))
        .bearer_auth(token)
        .header("content-type", mime)
        .body(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attachments_upload_after_reconnect_and_download_only_where_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, tokens) = TestRelay::start_with(dir.path().to_owned(), |c| c.max_blob_bytes = 256 * 1024).await;
    let mut bob = Agent::start(&relay, &tokens, "bob");
    let carol = Agent::start(&relay, &tokens, "carol");
    bob.connected().await;
    carol.connected().await;
    let (session, id) = widget_conversation(&relay, "sales", "Noor").await;
    eventually(10, "bob has the conversation", || bob.with(|r| r.summary(&id).is_some())).await;
    bob.act(&id, |r| r.join(&id, Timestamp::now()).unwrap());

    // Picked while offline: the message waits, and so does the upload.
    bob.disconnect().await;
    let photo = png(640, 480);
    let hash = bob.attach(&id, "parcel.png", "image/png", &photo);
    assert_eq!(bob.with(|r| r.pending_blob_uploads().unwrap().len()), 1);
    let blob_url = |query: &str| format!("{}/api/conversations/{}/blobs/{hash}{query}", relay.url(), id.0);
    assert_eq!(get(blob_url(""), Some(&tokens["carol"])).await.0, 404, "not on the relay yet");

    // Back online: the file goes up, the message reaches carol, and carol can open it.
    bob.reconnect();
    bob.connected().await;
    eventually(15, "the upload finished", || bob.client().status().borrow().pending_uploads == 0).await;
    assert!(bob.with(|r| r.pending_blob_uploads().unwrap().is_empty()));
    eventually(10, "carol sees the attachment", || {
        carol.with(|r| {
            r.stored_messages(&id)
                .unwrap()
                .iter()
                .any(|m| matches!(&m.body, MessageBody::Attachment { file_name, .. } if file_name == "parcel.png"))
        })
    })
    .await;
    let downloaded = sync_client::download_blob(carol.config(), &id, &hash, false).await.unwrap();
    assert_eq!(downloaded, photo);
    let thumb = sync_client::download_blob(carol.config(), &id, &hash, true).await.unwrap();
    let thumb = image::load_from_memory(&thumb).unwrap();
    assert!(thumb.width() <= 320 && thumb.height() <= 320 && thumb.width() > 0, "{}x{}", thumb.width(), thumb.height());

    // Downloads are authorized like the conversation: another team, no token, a forged token or
    // the blob under another conversation all look like a missing file.
    assert_eq!(get(blob_url(""), Some(&tokens["dave"])).await.0, 404);
    assert_eq!(get(blob_url(""), None).await.0, 404);
    assert_eq!(get(blob_url(""), Some("forged")).await.0, 404);
    let (other_session, other) = widget_conversation(&relay, "sales", "Ola").await;
    let elsewhere = format!("{}/api/conversations/{}/blobs/{hash}", relay.url(), other.0);
    assert_eq!(get(elsewhere, Some(&tokens["carol"])).await.0, 404);

    // The widget customer of this conversation gets it; another customer does not.
    let widget_url = |s: &str| format!("{}/api/widget/blobs/{hash}?session={s}", relay.url());
    let (status, bytes, kind) = get(widget_url(&session), None).await;
    assert_eq!((status, kind.as_str()), (200, "image/png"));
    assert_eq!(bytes, photo);
    assert_eq!(get(widget_url(&other_session), None).await.0, 404);

    // Refused uploads say why, and nothing is stored.
    let token = &tokens["bob"];
    let pdf = b"%PDF-1.7 invoice".to_vec();
    let pdf_hash = BlobHash::of(&pdf).to_string();
    let (status, answer) = put(&relay, token, &id, &pdf_hash, "image/png", pdf.clone()).await;
    assert_eq!(status, 415, "{answer}");
    assert!(answer.contains("not image/png"), "{answer}");
    let html = b"<html><script>alert(1)</script></html>".to_vec();
    let (status, answer) = put(&relay, token, &id, BlobHash::of(&html).as_str(), "text/html", html).await;
    assert_eq!(status, 415, "{answer}");
    let (status, answer) = put(&relay, token, &id, hash.as_str(), "application/pdf", pdf.clone()).await;
    assert_eq!(status, 400, "content that does not match its address: {answer}");
    let big = "a line of a long log file\n".repeat(12_000).into_bytes();
    let (status, _) = put(&relay, token, &id, BlobHash::of(&big).as_str(), "text/plain", big).await;
    assert_eq!(status, 413, "over the relay's size limit");
    let (status, _) = put(&relay, &tokens["dave"], &id, &pdf_hash, "application/pdf", pdf.clone()).await;
    assert_eq!(status, 404, "not into another team's conversation");
    assert_eq!(get(format!("{}/api/conversations/{}/blobs/{pdf_hash}", relay.url(), id.0), Some(token)).await.0, 404);
    let (status, answer) = put(&relay, token, &id, &pdf_hash, "application/pdf", pdf.clone()).await;
    assert_eq!(status, 201, "{answer}");

    // A widget customer sends a file: it becomes their message, and the crew can open it.
    let notes = "Order 4471\nDelivered to the neighbour?\n".as_bytes().to_vec();
    let r = reqwest::Client::new()
        .post(format!("{}/api/widget/blobs?session={session}", relay.url()))
        .header("content-type", "text/plain")
        .header("x-file-name", "notes%20%C3%A4.txt")
        .body(notes.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let notes_hash = BlobHash::of(&notes);
    eventually(10, "bob sees the customer's file", || {
        bob.with(|r| {
            r.stored_messages(&id).unwrap().iter().any(|m| {
                m.author == Author::Customer
                    && matches!(&m.body, MessageBody::Attachment { file_name, blob, .. } if file_name == "notes ä.txt" && blob.ends_with(notes_hash.as_str()))
            })
        })
    })
    .await;
    assert_eq!(sync_client::download_blob(bob.config(), &id, &notes_hash, false).await.unwrap(), notes);
    let r = reqwest::Client::new()
        .post(format!("{}/api/widget/blobs?session=cws_forged", relay.url()))
        .body(notes.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);

    // Stored durably: after a restart the files are still there.
    relay.stop().await;
    relay.restart().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(sync_client::download_blob(carol.config(), &id, &hash, false).await.unwrap(), photo);
    relay.stop().await;
}

/// Every directory and file under `dir` with its permission bits.
#[cfg(unix)]
fn modes(dir: &std::path::Path) -> Vec<(std::path::PathBuf, bool, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        out.push((d.clone(), true, std::fs::metadata(&d).unwrap().permissions().mode() & 0o777));
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else {
                out.push((path.clone(), false, std::fs::metadata(&path).unwrap().permissions().mode() & 0o777));
            }
        }
    }
    out
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relays_data_directory_and_files_are_readable_by_its_user_only() {
    use std::os::unix::fs::PermissionsExt;
    // A data directory an operator made with a plain `mkdir` (0755), with a database from before.
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("relay-data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (mut relay, tokens) = TestRelay::start(data.clone()).await;
    let bob = Agent::start(&relay, &tokens, "bob");
    bob.connected().await;
    let (session, id) = widget_conversation(&relay, "sales", "Noor").await;
    let r = reqwest::Client::new()
        .post(format!("{}/api/widget/blobs?session={session}", relay.url()))
        .header("content-type", "image/png")
        .body(png(64, 48))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    eventually(10, "bob has the photo", || {
        bob.with(|r| r.stored_messages(&id).unwrap().iter().any(|m| matches!(m.body, MessageBody::Attachment { .. })))
    })
    .await;

    let found = modes(&data);
    let names: Vec<String> = found.iter().map(|(p, ..)| p.display().to_string()).collect();
    assert!(names.iter().any(|n| n.contains("/blobs/thumbs/")), "a thumbnail was written: {names:?}");
    if relay.store.is_none() {
        for file in ["relay.sqlite3", "relay.sqlite3-wal", "relay.sqlite3-shm"] {
            assert!(data.join(file).exists(), "{file} exists");
        }
    }
    for (path, is_dir, mode) in &found {
        let want = if *is_dir { 0o700 } else { 0o600 };
        assert_eq!(*mode, want, "{} is {mode:o}, not {want:o}", path.display());
    }
    relay.stop().await;
}

async fn widget_upload(relay: &TestRelay, session: &str, mime: &str, body: Vec<u8>) -> (u16, String) {
    let r = reqwest::Client::new()
        .post(format!("{}/api/widget/blobs?session={session}", relay.url()))
        .header("content-type", mime)
        .body(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Files stored on the relay's disk (thumbnails included).
fn stored_files(relay: &TestRelay) -> usize {
    let dir = relay.data.join("blobs");
    let mut n = 0;
    let mut todo = vec![dir];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else {
                n += 1;
            }
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_over_the_pixel_cap_and_files_over_the_teams_quota_are_refused_and_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let photo = png(1000, 1000);
    // Room for the photo and one 6,000-byte text file.
    let quota = photo.len() as u64 + 10_000;
    let (mut relay, tokens) = TestRelay::start_with(dir.path().to_owned(), move |c| {
        c.max_image_pixels = 1_000_000;
        c.team_blob_quota_bytes = quota;
    })
    .await;
    let (session, id) = widget_conversation(&relay, "sales", "Noor").await;

    // 1200 × 1000 is over a megapixel: refused from its header, nothing stored, no message.
    let big = png(1200, 1000);
    let (status, answer) = widget_upload(&relay, &session, "image/png", big.clone()).await;
    assert_eq!(status, 422, "{answer}");
    assert!(
        answer.contains("1200×1000 pixels (1.2 megapixels)") && answer.contains("up to 1.0 megapixels"),
        "{answer}"
    );
    assert_eq!(stored_files(&relay), 0, "nothing stored");
    let big_hash = BlobHash::of(&big);
    let (status, ..) = get(format!("{}/api/widget/blobs/{big_hash}?session={session}", relay.url()), None).await;
    assert_eq!(status, 404);
    // The agent's route answers the same.
    let (status, answer) = put(&relay, &tokens["bob"], &id, big_hash.as_str(), "image/png", big).await;
    assert_eq!(status, 422, "{answer}");
    let (status, answer) = widget_upload(&relay, &session, "image/png", photo).await;
    assert_eq!(status, 201, "exactly a megapixel passes: {answer}");

    // The quota: each file counted once per team.
    let files_before = stored_files(&relay);
    let text = |c: char| format!("{}\n", c.to_string().repeat(5_999)).into_bytes();
    let (status, answer) = widget_upload(&relay, &session, "text/plain", text('a')).await;
    assert_eq!(status, 201, "{answer}");
    let (status, answer) = widget_upload(&relay, &session, "text/plain", text('a')).await;
    assert_eq!(status, 201, "the same file again costs nothing: {answer}");
    let used: u64 = {
        let store = relay.open_store();
        store.team_blob_usage(&crewdesk::domain::TeamId("sales".into()), "").unwrap().0
    };
    assert!(used + 6_000 > quota && used <= quota, "the next file does not fit ({used} of {quota} bytes used)");
    let (status, answer) = widget_upload(&relay, &session, "text/plain", text('b')).await;
    assert_eq!(status, 507, "{answer}");
    assert!(
        answer.contains("this team's file storage is full") && answer.contains("team_blob_quota_bytes"),
        "{answer}"
    );
    assert_eq!(stored_files(&relay), files_before + 1, "only the first text file was stored");
    let b_hash = BlobHash::of(&text('b'));
    let (status, ..) = get(format!("{}/api/widget/blobs/{b_hash}?session={session}", relay.url()), None).await;
    assert_eq!(status, 404);

    // Another team has its own quota.
    let (other, _) = widget_conversation(&relay, "support", "Lee").await;
    let (status, answer) = widget_upload(&relay, &other, "text/plain", text('b')).await;
    assert_eq!(status, 201, "{answer}");
    relay.stop().await;
}
