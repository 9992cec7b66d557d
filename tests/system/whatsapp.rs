//! The WhatsApp Cloud API channel end to end: Meta's webhook handshake and signed deliveries
//! (retries change nothing), conversations on the crew's replicas, replies and templates handed to
//! a local stand-in of the Graph API, and the 24 h window enforced on both sides.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use crewdesk::demo;
use crewdesk::domain::{Author, Channel, ConversationId, DomainError, Message, MessageBody, Timestamp};
use crewdesk::replica::ReplicaError;
use crewdesk::replica::doc;
use std::time::Duration;
use sync_server::whatsapp::{WhatsAppConfig, sign};
use system_tests::{Agent, GraphStandIn, TestRelay, eventually, png};

const SECRET: &str = "app-secret-for-tests";

/// The channel as the tests configure it, against the Graph API stand-in.
fn whatsapp_config(graph: &GraphStandIn) -> WhatsAppConfig {
    WhatsAppConfig {
        team: "sales".into(),
        verify_token: "verify-me".into(),
        app_secret: SECRET.into(),
        access_token: "graph-access-token".into(),
        phone_number_id: "106540352242922".into(),
        api_base: graph.base.clone(),
    }
}

fn webhook_body(wamid: &str, from: &str, name: &str, text: &str, at_secs: i64) -> String {
    let message = serde_json::json!({ "from": from, "id": wamid, "timestamp": at_secs.to_string(), "type": "text", "text": { "body": text } });
    webhook_with(from, name, message)
}

fn webhook_with(from: &str, name: &str, message: serde_json::Value) -> String {
    serde_json::json!({
        "object": "whatsapp_business_account",
        "entry": [{ "id": "102290129340398", "changes": [{ "field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": { "display_phone_number": "15550783881", "phone_number_id": "106540352242922" },
            "contacts": [{ "profile": { "name": name }, "wa_id": from }],
            "messages": [message],
        }}]}],
    })
    .to_string()
}

async fn post_webhook(relay: &TestRelay, body: &str, signature: Option<String>) -> u16 {
    let mut request = reqwest::Client::new()
        .post(format!("{}/api/whatsapp/webhook", relay.url()))
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(s) = signature {
        request = request.header("x-hub-signature-256", s);
    }
    request.send().await.unwrap().status().as_u16()
}

fn whatsapp_conversations(agent: &Agent) -> Vec<ConversationId> {
    agent.with(|r| {
        r.stored_summaries().unwrap().into_iter().filter(|s| s.channel == Channel::WhatsApp).map(|s| s.id).collect()
    })
}

fn conversation_of(agent: &Agent, phone: &str) -> Option<ConversationId> {
    agent.with(|r| {
        r.stored_summaries()
            .unwrap()
            .into_iter()
            .find(|s| s.channel == Channel::WhatsApp && s.customer.phone.as_deref() == Some(phone))
            .map(|s| s.id)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whatsapp_webhook_replies_templates_and_the_24_hour_window() {
    let graph = GraphStandIn::start("106540352242922", "graph-access-token").await;
    let dir = tempfile::tempdir().unwrap();
    let config = whatsapp_config(&graph);
    let (mut relay, tokens) =
        TestRelay::start_with(dir.path().to_owned(), move |c| c.whatsapp = Some(config.clone())).await;
    let http = reqwest::Client::new();

    // Meta's subscription handshake: the challenge comes back only for the right verify token.
    let verify = |token: &str| {
        http.get(format!(
            "{}/api/whatsapp/webhook?hub.mode=subscribe&hub.verify_token={token}&hub.challenge=1158201444",
            relay.url()
        ))
        .send()
    };
    let ok = verify("verify-me").await.unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    assert_eq!(ok.text().await.unwrap(), "1158201444");
    assert_eq!(verify("wrong").await.unwrap().status().as_u16(), 403);

    let bob = Agent::start(&relay, &tokens, "bob");
    bob.connected().await;
    let now_secs = Timestamp::now().0 / 1000;

    // Unsigned, wrongly signed or tampered deliveries are refused and change nothing.
    let first = webhook_body("wamid.AAA1", "4915112345678", "Kofi Mensah", "Has my order shipped?", now_secs);
    assert_eq!(post_webhook(&relay, &first, None).await, 401);
    assert_eq!(post_webhook(&relay, &first, Some(sign("another-secret", first.as_bytes()))).await, 401);
    let tampered = first.replace("Has my order shipped?", "Give me a refund");
    assert_eq!(post_webhook(&relay, &tampered, Some(sign(SECRET, first.as_bytes()))).await, 401);
    assert_eq!(post_webhook(&relay, "{not json", Some(sign(SECRET, b"{not json"))).await, 400);

    // A signed delivery starts a WhatsApp conversation for the team; a retry changes nothing.
    assert_eq!(post_webhook(&relay, &first, Some(sign(SECRET, first.as_bytes()))).await, 200);
    eventually(10, "bob has the WhatsApp conversation", || conversation_of(&bob, "+4915112345678").is_some()).await;
    let id = conversation_of(&bob, "+4915112345678").unwrap();
    let s = bob.with(|r| r.summary(&id).unwrap().clone());
    assert_eq!(s.customer.name, "Kofi Mensah");
    assert_eq!(s.team.as_str(), "sales");
    assert_eq!(post_webhook(&relay, &first, Some(sign(SECRET, first.as_bytes()))).await, 200);
    let second = webhook_body("wamid.AAA2", "4915112345678", "Kofi Mensah", "Order A-1001.", now_secs + 1);
    assert_eq!(post_webhook(&relay, &second, Some(sign(SECRET, second.as_bytes()))).await, 200);
    assert_eq!(post_webhook(&relay, &first, Some(sign(SECRET, first.as_bytes()))).await, 200);
    eventually(10, "the second message arrives", || bob.message_texts(&id).len() == 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(bob.message_texts(&id), ["Has my order shipped?", "Order A-1001."]);
    assert_eq!(whatsapp_conversations(&bob).len(), 1, "one conversation per contact");

    // Inside the window a free-text reply goes to the Graph API, once.
    bob.act(&id, |r| r.join(&id, Timestamp::now()).unwrap());
    bob.act(&id, |r| r.send(&id, MessageBody::Text { text: "Yes, it left today.".into() }, Timestamp::now()).unwrap());
    eventually(10, "the reply reaches WhatsApp", || !graph.accepted().is_empty()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sent = graph.accepted();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0]["to"], "4915112345678");
    assert_eq!(sent[0]["type"], "text");
    assert_eq!(sent[0]["text"]["body"], "Yes, it left today.");
    assert!(graph.refused.lock().unwrap().is_empty(), "{:?}", graph.refused.lock().unwrap());

    // Files: uploaded to WhatsApp's media endpoint once the relay has them, then sent by media id.
    let photo = png(64, 48);
    bob.attach(&id, "label.png", "image/png", &photo);
    let pdf = b"%PDF-1.4 delivery note".to_vec();
    bob.attach(&id, "delivery-note.pdf", "application/pdf", &pdf);
    eventually(15, "both files reach WhatsApp", || graph.accepted().len() == 3).await;
    // (The two may go in either order: each waits for its own upload from bob's app.)
    let media = graph.media.lock().unwrap().clone();
    let media_id = |bytes: &[u8]| format!("media-{}", media.iter().position(|(_, b)| b == bytes).unwrap() + 1);
    assert_eq!(media.len(), 2);
    assert!(
        media.contains(&("image/png".to_owned(), photo.clone()))
            && media.contains(&("application/pdf".to_owned(), pdf.clone()))
    );
    let sent = graph.accepted();
    let of_type = |t: &str| sent.iter().find(|m| m["type"] == t).unwrap().clone();
    assert_eq!(of_type("image")["image"]["id"], media_id(&photo).as_str());
    assert_eq!(of_type("document")["document"]["id"], media_id(&pdf).as_str());
    assert_eq!(of_type("document")["document"]["filename"], "delivery-note.pdf");
    assert!(sent.iter().all(|m| m.get("crewdesk_blob").is_none()), "internal fields never reach WhatsApp");

    // A file of another conversation, named by its hash in a crew message here, is never read for
    // WhatsApp: files are read only for the conversation they were uploaded into.
    let other = relay.customer_conversation(&tokens["ada"], demo::SALES, Channel::Email).await;
    bob.has(&other).await;
    bob.act(&other, |r| r.join(&other, Timestamp::now()).unwrap());
    let secret = b"%PDF-1.4 another customer's contract".to_vec();
    let hash = bob.attach(&other, "contract.pdf", "application/pdf", &secret);
    eventually(15, "uploaded", || bob.with(|r| r.pending_blob_uploads().unwrap().is_empty())).await;
    let body = MessageBody::Attachment {
        blob: hash.reference(),
        file_name: "contract.pdf".into(),
        mime: "application/pdf".into(),
        size: secret.len() as u64,
    };
    bob.act(&id, |r| r.send(&id, body, Timestamp::now()).unwrap());
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(graph.media.lock().unwrap().len(), 2, "no upload of another conversation's file");
    assert_eq!(graph.accepted().len(), 3);

    // The customer sends a photo with a caption: the relay fetches it from the Graph API into the
    // blob store, and the crew gets it as an attachment. Audio is not kept: the crew gets a note.
    graph.inbound.lock().unwrap().insert("1180355432".into(), ("image/png".into(), photo.clone()));
    let image = webhook_with(
        "4915112345678",
        "Kofi Mensah",
        serde_json::json!({ "from": "4915112345678", "id": "wamid.IMG1", "timestamp": now_secs.to_string(), "type": "image",
            "image": { "id": "1180355432", "mime_type": "image/png", "sha256": "x", "caption": "The box arrived like this" } }),
    );
    assert_eq!(post_webhook(&relay, &image, Some(sign(SECRET, image.as_bytes()))).await, 200);
    graph.inbound.lock().unwrap().insert("99001".into(), ("audio/ogg".into(), b"OggS\0\x02voice".to_vec()));
    let audio = webhook_with(
        "4915112345678",
        "Kofi Mensah",
        serde_json::json!({ "from": "4915112345678", "id": "wamid.AUD1", "timestamp": now_secs.to_string(), "type": "audio",
            "audio": { "id": "99001", "mime_type": "audio/ogg" } }),
    );
    assert_eq!(post_webhook(&relay, &audio, Some(sign(SECRET, audio.as_bytes()))).await, 200);
    eventually(10, "bob sees the photo, its caption and the note", || {
        let texts = bob.message_texts(&id);
        texts.iter().any(|t| t == "The box arrived like this") && texts.iter().any(|t| t.contains("audio message"))
    })
    .await;
    let from_customer = bob.with(|r| r.stored_messages(&id).unwrap());
    let hash = from_customer
        .iter()
        .find_map(|m| match (&m.author, &m.body) {
            (Author::Customer, MessageBody::Attachment { mime, .. }) if mime == "image/png" => m.body.blob(),
            _ => None,
        })
        .expect("the photo is an attachment from the customer");
    assert_eq!(sync_client::download_blob(bob.config(), &id, &hash, false).await.unwrap(), photo);
    assert_eq!(post_webhook(&relay, &image, Some(sign(SECRET, image.as_bytes()))).await, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        bob.message_texts(&id).iter().filter(|t| *t == "The box arrived like this").count(),
        1,
        "a retried photo changes nothing"
    );

    // A customer who last wrote 25 hours ago: free text is refused on the replica, a template goes out.
    let old = webhook_body("wamid.BBB1", "447700900123", "Lena Fischer", "Hello?", now_secs - 25 * 3600);
    assert_eq!(post_webhook(&relay, &old, Some(sign(SECRET, old.as_bytes()))).await, 200);
    eventually(10, "bob has Lena's conversation", || conversation_of(&bob, "+447700900123").is_some()).await;
    let late = conversation_of(&bob, "+447700900123").unwrap();
    bob.act(&late, |r| r.join(&late, Timestamp::now()).unwrap());
    let refused = bob.with(|r| r.send(&late, MessageBody::Text { text: "Hi".into() }, Timestamp::now()));
    assert!(
        matches!(refused, Err(ReplicaError::Denied(DomainError::WhatsAppWindowClosed))),
        "free text outside the window: {refused:?}"
    );
    bob.act(&late, |r| {
        r.send_whatsapp_template(&late, "order_update", vec!["Lena".into(), "A-2002".into()], Timestamp::now()).unwrap()
    });
    eventually(10, "the template reaches WhatsApp", || graph.accepted().len() == 4).await;
    let template = &graph.accepted()[3];
    assert_eq!(template["to"], "447700900123");
    assert_eq!(template["type"], "template");
    assert_eq!(template["template"]["name"], "order_update");
    assert_eq!(template["template"]["language"]["code"], "en_US");
    assert_eq!(template["template"]["components"][0]["parameters"][0]["text"], "Lena");
    assert_eq!(template["template"]["components"][0]["parameters"][1]["text"], "A-2002");

    // A replica that skips the rule (an old build, a hand-made change): the relay checks the window
    // again, does not hand the text to WhatsApp, and says so in the conversation.
    let sneaky = Message {
        id: doc::new_message_id(&mut rand::rng()),
        at: Timestamp::now(),
        author: doc::crew(&"bob".into()),
        body: MessageBody::Text { text: "Free text after 25 hours".into() },
    };
    bob.act(&late, |r| {
        let mut d = automerge::Automerge::load(&r.document_bytes(&late).unwrap()).unwrap();
        let before = d.get_heads();
        d.transact::<_, _, doc::DocError>(|tx| doc::add_message(tx, &sneaky)).unwrap();
        r.apply_changes(&late, &d.save_after(&before)).unwrap();
    });
    eventually(10, "the crew is told it was not delivered", || {
        bob.with(|r| r.stored_messages(&late).unwrap().iter().any(|m| m.author == Author::System))
    })
    .await;
    let note = bob.message_texts(&late).into_iter().find(|t| t.starts_with("Not delivered on WhatsApp")).unwrap();
    assert!(note.contains("24 hours"), "{note}");
    assert_eq!(graph.accepted().len(), 4, "nothing more was sent: {:?}", graph.accepted());
    relay.stop().await;
}

/// Two relay instances over one PostgreSQL database hear from new contacts at the same moment
/// (Meta delivers each message to whichever instance the load balancer picks): one conversation per
/// contact, with both messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_contact_writing_through_two_instances_at_once_gets_one_conversation() {
    let graph = GraphStandIn::start("106540352242922", "graph-access-token").await;
    let dir = tempfile::tempdir().unwrap();
    let config = whatsapp_config(&graph);
    let (mut a, tokens) =
        TestRelay::start_on_with(dir.path().join("a"), Some(system_tests::postgres_database()), move |c| {
            c.whatsapp = Some(config.clone())
        })
        .await;
    let mut b = a.another_instance(dir.path().join("b")).await;
    let bob = Agent::start(&a, &tokens, "bob");
    bob.connected().await;
    let now_secs = Timestamp::now().0 / 1000;
    for k in 0..5 {
        let phone = format!("4915100000{k:02}");
        let first = webhook_body(&format!("wamid.RACE{k}a"), &phone, "Ines Ortega", "Hello?", now_secs);
        let second = webhook_body(&format!("wamid.RACE{k}b"), &phone, "Ines Ortega", "Anyone there?", now_secs + 1);
        let (s1, s2) = tokio::join!(
            post_webhook(&a, &first, Some(sign(SECRET, first.as_bytes()))),
            post_webhook(&b, &second, Some(sign(SECRET, second.as_bytes())))
        );
        assert_eq!((s1, s2), (200, 200));
    }
    eventually(20, "one conversation per contact, each with both messages", || {
        let all = whatsapp_conversations(&bob);
        all.len() == 5 && all.iter().all(|id| bob.message_texts(id).len() == 2)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(whatsapp_conversations(&bob).len(), 5, "no second conversation arrives late");
    a.stop().await;
    b.stop().await;
}

/// Runs `sync-server serve` with `args` and a config file; returns its exit success and stderr, or
/// panics when it is still running (serving) after 20 s.
fn serve_refused(config: &str, args: &[&str]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("relay.toml");
    std::fs::write(&file, config).unwrap();
    let data = dir.path().join("data");
    let port = system_tests::free_port().to_string();
    let mut child = std::process::Command::new(system_tests::relay_binary())
        .args(["--config", file.to_str().unwrap(), "--data-dir", data.to_str().unwrap(), "serve"])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(args)
        .env_remove("CREWDESK_SMTP")
        .env_remove("CREWDESK_STORE")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the relay started serving with {config:?} {args:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!data.join("relay.sqlite3").exists(), "nothing was stored before the refusal");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn the_relay_binary_refuses_whatsapp_with_a_blank_app_secret_and_plain_smtp_over_the_network() {
    let whatsapp = "[whatsapp]\nteam = \"support\"\nverify_token = \"v\"\napp_secret = \" \"\naccess_token = \"a\"\nphone_number_id = \"1\"\n";
    let (ok, stderr) = serve_refused(whatsapp, &[]);
    assert!(!ok && stderr.contains("its app_secret is empty"), "{stderr}");
    let (ok, stderr) = serve_refused("", &["--smtp", "mail.example.com:25"]);
    assert!(!ok && stderr.contains("unencrypted"), "{stderr}");
    let (ok, stderr) = serve_refused("smtp = \"smtps://desk@mail.example.com\"\n", &[]);
    assert!(!ok && stderr.contains("--smtp-password-file"), "{stderr}");
}
