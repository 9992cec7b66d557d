//! The email channel against a real IMAP server (Dovecot on loopback) and the SMTP sink: a
//! customer's email becomes a conversation, the crew's reply arrives threaded, the customer's
//! answer joins the same conversation, files both ways, internal notes never leave, auto-replies
//! start no loop, and a mail read again is not written twice.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use crewdesk::domain::{Author, Channel, ConversationId, MessageBody, TeamId, Timestamp};
use std::time::Duration;
use system_tests::{Agent, Dovecot, RelayProcess, SmtpSink, TestRelay, eventually, wait_listening};

fn text(t: &str) -> MessageBody {
    MessageBody::Text { text: t.to_owned() }
}

const SALES: &str = "sales";

/// A relay whose Sales team follows the Dovecot mailbox and sends by the SMTP sink.
async fn relay_with_mailbox(
    dovecot: &Dovecot,
    sink: &SmtpSink,
    dir: &std::path::Path,
) -> (TestRelay, std::collections::HashMap<String, String>) {
    let smtp = sink.addr.to_string();
    let (relay, tokens) = TestRelay::start_with(dir.to_owned(), move |c| c.smtp = Some(smtp.clone())).await;
    relay.open_store().set_mailbox(&dovecot.setting(SALES)).unwrap();
    (relay, tokens)
}

/// Dovecot, an SMTP sink (refusing one recipient when given), a relay following the mailbox and
/// bob's desk, connected.
struct Setup {
    dovecot: Dovecot,
    sink: SmtpSink,
    relay: TestRelay,
    bob: Agent,
    _dir: tempfile::TempDir,
}

async fn setup(refused: Option<&'static str>) -> Setup {
    let dovecot = Dovecot::start().await;
    let sink = SmtpSink::refusing(refused).await;
    let dir = tempfile::tempdir().unwrap();
    let (relay, tokens) = relay_with_mailbox(&dovecot, &sink, dir.path()).await;
    let bob = Agent::start(&relay, &tokens, "bob");
    bob.connected().await;
    Setup { dovecot, sink, relay, bob, _dir: dir }
}

/// The one Email conversation bob's replica holds, once it is there.
async fn email_conversation(bob: &Agent) -> ConversationId {
    let mut found = None;
    eventually(30, "the email becomes a conversation on bob's desk", || {
        found = bob.with(|r| {
            r.stored_summaries().unwrap_or_default().into_iter().find(|s| s.channel == Channel::Email).map(|s| s.id)
        });
        found.is_some()
    })
    .await;
    found.unwrap()
}

/// A header's value, its folded lines joined.
fn header(mail: &str, name: &str) -> Option<String> {
    let head = mail.split("\n\n").next().unwrap_or_default().replace("\n ", " ").replace("\n\t", " ");
    head.lines().find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(": ")).map(str::to_owned))
}

fn png_mail(boundary: &str) -> String {
    use base64::Engine;
    let png = base64::engine::general_purpose::STANDARD.encode(system_tests::png(4, 3));
    format!(
        "From: Maya Hansen <maya@example.org>\r\nTo: Sales <support@example.com>\r\nSubject: Where is my parcel?\r\n\
         Message-ID: <first.maya@example.org>\r\nDate: Tue, 01 Dec 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"{boundary}\"\r\n\r\n--{boundary}\r\n\
         Content-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n\
         Hello, I ordered a lamp on Monday. Gr=FC=DFe, Maya\r\n--{boundary}\r\n\
         Content-Type: image/png; name=\"receipt.png\"\r\nContent-Disposition: attachment; filename=\"receipt.png\"\r\n\
         Content-Transfer-Encoding: base64\r\n\r\n{png}\r\n--{boundary}--\r\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_email_becomes_a_conversation_and_the_reply_threads_in_the_customers_mail_client() {
    let Setup { dovecot, sink, mut relay, bob, _dir } = setup(None).await;

    // The customer writes to the team's address: text (quoted-printable, Latin-1) and a file.
    dovecot.deliver(&png_mail("b1")).await;
    let id = email_conversation(&bob).await;
    eventually(15, "the mail's text and its file", || bob.message_texts(&id).len() == 2).await;
    let summary = bob.with(|r| r.summary(&id).cloned()).unwrap();
    assert_eq!(summary.channel, Channel::Email);
    assert_eq!(summary.team, TeamId(SALES.into()));
    let customer = bob.with(|r| r.customer(&id)).unwrap();
    assert_eq!((customer.name.as_str(), customer.email.as_deref()), ("Maya Hansen", Some("maya@example.org")));
    let messages = bob.with(|r| r.stored_messages(&id)).unwrap();
    assert_eq!(messages[0].body, text("Where is my parcel?\n\nHello, I ordered a lamp on Monday. Grüße, Maya"));
    assert_eq!(messages[0].author, Author::Customer);
    match &messages[1].body {
        MessageBody::Attachment { file_name, mime, .. } => {
            assert_eq!((file_name.as_str(), mime.as_str()), ("receipt.png", "image/png"))
        }
        other => panic!("expected the file, got {other:?}"),
    }

    // Bob replies and writes an internal note: the reply goes out threaded, the note never.
    bob.act(&id, |r| r.join(&id, Timestamp::now()).unwrap());
    bob.act(&id, |r| {
        r.send(&id, MessageBody::Note { text: "VIP customer, check the warehouse".into() }, Timestamp::now()).unwrap()
    });
    bob.act(&id, |r| r.send(&id, text("Your lamp left our warehouse today."), Timestamp::now()).unwrap());
    eventually(20, "the reply reaches the customer's mailbox (SMTP)", || !sink.received().is_empty()).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mails = sink.received();
    assert_eq!(mails.len(), 1, "{mails:?}");
    let reply = &mails[0];
    assert!(reply.contains("Your lamp left our warehouse today."), "{reply}");
    assert!(!reply.contains("VIP customer"), "an internal note went out: {reply}");
    assert_eq!(header(reply, "Subject"), Some("Re: Where is my parcel?".into()), "{reply}");
    assert_eq!(header(reply, "In-Reply-To"), Some("<first.maya@example.org>".into()), "{reply}");
    assert_eq!(header(reply, "References"), Some("<first.maya@example.org>".into()), "{reply}");
    assert_eq!(header(reply, "From"), Some("Sales <support@example.com>".into()), "{reply}");
    assert!(header(reply, "To").is_some_and(|t| t.contains("maya@example.org")), "{reply}");
    let ours = header(reply, "Message-ID").expect("a Message-ID");
    assert!(ours.ends_with("@example.com>"), "our own domain: {ours}");

    // The customer answers from her mail client (another subject line even): same conversation.
    dovecot
        .deliver(&format!(
            "From: Maya Hansen <maya@example.org>\r\nTo: support@example.com\r\nSubject: Re: Where is my parcel?\r\n\
             Message-ID: <second.maya@example.org>\r\nIn-Reply-To: {ours}\r\nReferences: <first.maya@example.org> {ours}\r\n\r\n\
             Thanks, that was quick!\r\n\r\nOn Tue, 1 Dec 2026, Sales <support@example.com> wrote:\r\n> Your lamp left our warehouse today.\r\n"
        ))
        .await;
    eventually(20, "the answer joins the conversation", || {
        bob.message_texts(&id).last().map(String::as_str) == Some("Thanks, that was quick!")
    })
    .await;
    let conversations =
        bob.with(|r| r.stored_summaries().unwrap().into_iter().filter(|s| s.channel == Channel::Email).count());
    assert_eq!(conversations, 1);

    // An out-of-office answer to our reply starts and continues nothing.
    let before = bob.message_texts(&id).len();
    dovecot
        .deliver(&format!(
            "From: maya@example.org\r\nTo: support@example.com\r\nSubject: Out of office\r\nAuto-Submitted: auto-replied\r\n\
             Message-ID: <ooo.maya@example.org>\r\nIn-Reply-To: {ours}\r\n\r\nI am away until Monday.\r\n"
        ))
        .await;
    // A mail that follows it is taken in, so the auto-reply was read (and left out) before.
    dovecot
        .deliver("From: Maya Hansen <maya@example.org>\r\nTo: support@example.com\r\nSubject: Re: Where is my parcel?\r\nMessage-ID: <third.maya@example.org>\r\nIn-Reply-To: <second.maya@example.org>\r\n\r\nOne more thing: the colour is blue.\r\n")
        .await;
    eventually(20, "the next mail arrives", || bob.message_texts(&id).len() == before + 1).await;
    assert!(!bob.message_texts(&id).iter().any(|t| t.contains("away until Monday")));

    // A crew file goes out attached, in the same thread.
    bob.attach(&id, "invoice.pdf", "application/pdf", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\ninvoice for Maya\n");
    eventually(30, "the reply with the file", || sink.received().len() == 2).await;
    let with_file = sink.received()[1].clone();
    assert!(with_file.contains("filename=\"invoice.pdf\""), "{with_file}");
    assert_eq!(header(&with_file, "In-Reply-To"), Some("<third.maya@example.org>".into()), "{with_file}");
    assert!(
        header(&with_file, "References").is_some_and(|r| r.contains("<first.maya@example.org>") && r.contains(&ours)),
        "{with_file}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(sink.received().len(), 2, "each reply is sent once");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mail_read_again_is_not_written_twice() {
    let Setup { dovecot, sink: _sink, mut relay, bob, _dir } = setup(None).await;
    dovecot.deliver(&png_mail("b2")).await;
    dovecot
        .deliver("From: Leo <leo@example.net>\r\nTo: support@example.com\r\nSubject: Opening hours\r\n\r\nAre you open on Sunday?\r\n")
        .await;
    eventually(30, "both mails are conversations", || {
        bob.with(|r| r.stored_summaries().unwrap_or_default().iter().filter(|s| s.channel == Channel::Email).count())
            == 2
    })
    .await;
    let store = relay.open_store();
    let read = store.mailboxes().unwrap().into_iter().next().unwrap();
    assert_eq!(read.last_uid, 2, "both UIDs recorded");
    relay.stop().await;
    // The mailbox's progress lost (a store restored from an older backup, say): every mail is read
    // again. Leo's mail has no Message-ID, so only the ids that follow from its UID keep it from
    // being written twice.
    store.mailbox_read(&TeamId(SALES.into()), read.uidvalidity, 0).unwrap();
    drop(store);
    relay.restart().await;
    bob.connected().await;
    eventually(30, "the mails are read again", || {
        relay.open_store().mailboxes().unwrap().into_iter().next().is_some_and(|m| m.last_uid == 2)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let summaries: Vec<_> =
        bob.with(|r| r.stored_summaries().unwrap().into_iter().filter(|s| s.channel == Channel::Email).collect());
    assert_eq!(summaries.len(), 2, "no second conversation");
    for s in &summaries {
        let texts = bob.message_texts(&s.id);
        let mut unique = texts.clone();
        unique.dedup();
        assert_eq!(texts, unique, "no message twice");
        assert!(texts.len() <= 2, "{texts:?}");
    }
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_and_odd_mail_is_noted_or_skipped_and_the_mailbox_keeps_being_read() {
    let Setup { dovecot, sink: _sink, mut relay, bob, _dir } = setup(None).await;
    // Not a mail at all; then an HTML-only mail with a script; then a program attached; then a
    // mail larger than the relay takes in.
    dovecot.deliver("\u{1}\u{2}garbage without any header\r\n\r\n\u{0}").await;
    dovecot
        .deliver(
            "From: Nora <nora@example.com.br>\r\nTo: support@example.com\r\nSubject: =?UTF-8?B?UGVkaWRvIGF0cmFzYWRv?=\r\n\
             MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n\
             <html><head><script>alert('x')</script></head><body><p>Meu pedido <b>atrasou</b>.</p></body></html>\r\n",
        )
        .await;
    dovecot
        .deliver(
            "From: Omar <omar@example.net>\r\nTo: support@example.com\r\nSubject: Invoice\r\nMIME-Version: 1.0\r\n\
             Content-Type: multipart/mixed; boundary=\"x\"\r\n\r\n--x\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n\
             --x\r\nContent-Type: application/x-msdownload; name=\"invoice.exe\"\r\nContent-Disposition: attachment; filename=\"invoice.exe\"\r\n\
             Content-Transfer-Encoding: base64\r\n\r\nTVqQAAMAAAAEAAAA//8AALgAAAAAAAAAQAAAAAAAAAA=\r\n--x--\r\n",
        )
        .await;
    let big = format!(
        "From: Pia <pia@example.org>\r\nTo: support@example.com\r\nSubject: Scans\r\n\r\n{}",
        "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789\r\n"
            .repeat((sync_server::email::MAX_MAIL_BYTES as usize) / 76 + 1000)
    );
    dovecot.deliver(&big).await;
    let by_customer = |name: &str| {
        bob.with(|r| {
            r.stored_summaries().unwrap_or_default().into_iter().find(|s| s.customer.name == name).map(|s| s.id)
        })
    };
    eventually(60, "three conversations (the garbage starts none)", || {
        ["Nora", "Omar", "Pia"].iter().all(|n| by_customer(n).is_some())
    })
    .await;
    let nora = bob.message_texts(&by_customer("Nora").unwrap());
    assert_eq!(nora, vec!["Pedido atrasado\n\nMeu pedido atrasou.".to_owned()], "HTML as plain text, no script");
    let omar = by_customer("Omar").unwrap();
    eventually(10, "Omar's text and the note on his file", || bob.message_texts(&omar).len() == 2).await;
    let omar_messages = bob.with(|r| r.stored_messages(&omar)).unwrap();
    assert_eq!(omar_messages[1].author, Author::System);
    assert!(
        bob.message_texts(&omar)[1].contains("invoice.exe, which Crewdesk does not keep"),
        "{:?}",
        bob.message_texts(&omar)
    );
    let pia_id = by_customer("Pia").unwrap();
    let pia = bob.with(|r| r.stored_messages(&pia_id)).unwrap();
    assert_eq!(pia.len(), 1);
    assert_eq!(pia[0].author, Author::System);
    assert!(bob.message_texts(&pia_id)[0].contains("larger than the 25 MB"), "{pia:?}");
    assert_eq!(relay.open_store().mailboxes().unwrap()[0].last_uid, 4, "every mail read, the garbage too");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thread_an_agent_starts_goes_out_the_answer_joins_it_and_a_refused_reply_is_noted() {
    use crewdesk::domain::{Customer, CustomerId};
    use crewdesk::replica::doc::NewConversation;
    let Setup { dovecot, sink, mut relay, bob, _dir } = setup(Some("nobody@example.net")).await;
    let start = |name: &str, email: &str, first: &str| {
        let id = crewdesk::replica::doc::new_conversation_id(&mut rand::rng());
        let new = NewConversation {
            id: id.clone(),
            team: TeamId(SALES.into()),
            channel: Channel::Email,
            customer: Customer {
                id: CustomerId(format!("c-{email}")),
                name: name.into(),
                email: Some(email.into()),
                phone: None,
                notes: None,
            },
            created_at: Timestamp::now(),
        };
        bob.act(&id, |r| r.create_conversation(&new, None).unwrap());
        bob.act(&id, |r| r.join(&id, Timestamp::now()).unwrap());
        bob.act(&id, |r| r.send(&id, text(first), Timestamp::now()).unwrap());
        id
    };
    // Bob writes first (an agent starts an email thread in the desk).
    let ines = start("Inês Costa", "ines@example.pt", "Your refund was approved today.");
    eventually(20, "the first mail goes out", || !sink.received().is_empty()).await;
    let first = sink.received()[0].clone();
    assert!(header(&first, "In-Reply-To").is_none(), "a new thread answers nothing: {first}");
    assert_eq!(header(&first, "Subject"), Some("Your conversation with Sales".into()), "{first}");
    assert!(first.contains("Your refund was approved today."), "{first}");
    let ours = header(&first, "Message-ID").unwrap();
    dovecot
        .deliver(&format!(
            "From: =?UTF-8?Q?In=C3=AAs_Costa?= <ines@example.pt>\r\nTo: support@example.com\r\nSubject: Re: Your conversation with Sales\r\n\
             Message-ID: <ines.1@example.pt>\r\nIn-Reply-To: {ours}\r\n\r\nObrigada!\r\n"
        ))
        .await;
    eventually(20, "Inês's answer joins bob's thread", || {
        bob.message_texts(&ines).last().map(String::as_str) == Some("Obrigada!")
    })
    .await;

    // A reply to an address the mail server refuses for good: given up and noted, not retried.
    let nobody = start("Nobody", "nobody@example.net", "Hello?");
    eventually(20, "the refusal is noted in the conversation", || {
        bob.message_texts(&nobody).iter().any(|t| t.starts_with("This reply could not be sent by email"))
    })
    .await;
    let note = bob.with(|r| r.stored_messages(&nobody)).unwrap().into_iter().last().unwrap();
    assert_eq!(note.author, Author::System);
    assert!(
        bob.message_texts(&nobody).last().unwrap().contains("no such mailbox here"),
        "{:?}",
        bob.message_texts(&nobody)
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sender_gets_thirty_mails_an_hour_into_the_desk() {
    let Setup { dovecot, sink: _sink, mut relay, bob, _dir } = setup(None).await;
    let limit = sync_server::email::MAILS_PER_SENDER_PER_HOUR;
    for i in 0..limit + 5 {
        dovecot
            .deliver(&format!(
                "From: Flood <flood@example.org>\r\nTo: support@example.com\r\nSubject: Mail {i}\r\nMessage-ID: <flood.{i}@example.org>\r\n\r\nMail number {i}\r\n"
            ))
            .await;
    }
    // One from somebody else afterwards: read once the flood has been.
    dovecot
        .deliver("From: Kim <kim@example.org>\r\nTo: support@example.com\r\nSubject: Hi\r\n\r\nA normal question\r\n")
        .await;
    let conversation_of = |name: &str| {
        bob.with(|r| {
            r.stored_summaries().unwrap_or_default().into_iter().find(|s| s.customer.name == name).map(|s| s.id)
        })
    };
    eventually(60, "Kim's mail after the flood", || conversation_of("Kim").is_some()).await;
    let flood = conversation_of("Flood").unwrap();
    eventually(10, "the flood's mails in one conversation", || bob.message_texts(&flood).len() == limit).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(bob.message_texts(&flood).len(), limit, "at most {limit} mails an hour from one sender");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_while_taking_mail_in_loses_and_duplicates_nothing() {
    use base64::Engine;
    const MAILS: usize = 60;
    let dovecot = Dovecot::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut setup, tokens) = TestRelay::start(dir.path().to_owned()).await;
    setup.stop().await;
    setup.open_store().set_mailbox(&dovecot.setting(SALES)).unwrap();
    // Sixty customers write, each with a photo (a conversation, then its file: two commits).
    let png = base64::engine::general_purpose::STANDARD.encode(system_tests::png(64, 48));
    for i in 0..MAILS {
        dovecot
            .deliver(&format!(
                "From: Customer {i} <customer{i}@example.org>\r\nTo: support@example.com\r\nSubject: Order {i}\r\n\
                 Message-ID: <order.{i}@example.org>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"p\"\r\n\r\n\
                 --p\r\nContent-Type: text/plain\r\n\r\nMy order {i} arrived broken.\r\n--p\r\n\
                 Content-Type: image/png; name=\"photo-{i}.png\"\r\nContent-Disposition: attachment; filename=\"photo-{i}.png\"\r\n\
                 Content-Transfer-Encoding: base64\r\n\r\n{png}\r\n--p--\r\n"
            ))
            .await;
    }
    let port = setup.addr.port();
    let read = || setup.open_store().mailboxes().unwrap()[0].last_uid;
    let mut child = RelayProcess::spawn(dir.path(), setup.store.as_deref(), port);
    wait_listening(port).await;
    // SIGKILL while the mails are being taken in.
    eventually(60, "the relay takes the first mail in", || read() >= 1).await;
    child.kill();
    let at_kill = read();
    assert!(at_kill < MAILS as i64, "killed while taking mail in ({at_kill} of {MAILS} recorded)");
    let _child = RelayProcess::spawn(dir.path(), setup.store.as_deref(), port);
    wait_listening(port).await;
    eventually(120, "every mail taken in after the restart", || read() == MAILS as i64).await;
    let bob = Agent::start(&setup, &tokens, "bob");
    let emails = || {
        bob.with(|r| {
            r.stored_summaries()
                .unwrap_or_default()
                .into_iter()
                .filter(|s| s.channel == Channel::Email)
                .collect::<Vec<_>>()
        })
    };
    eventually(60, "bob has a conversation per mail", || emails().len() == MAILS).await;
    for conversation in emails() {
        eventually(30, "each conversation has its text and its photo", || {
            bob.message_texts(&conversation.id).len() == 2
        })
        .await;
        let messages = bob.with(|r| r.stored_messages(&conversation.id)).unwrap();
        assert!(matches!(messages[1].body, MessageBody::Attachment { .. }), "{messages:?}");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(emails().len(), MAILS, "no conversation twice");
    println!("killed with {at_kill} of {MAILS} mails recorded; after the restart every mail is there once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_idle_is_asked_for_new_mail_every_thirty_seconds() {
    let dovecot = Dovecot::without_idle().await;
    let sink = SmtpSink::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, tokens) = relay_with_mailbox(&dovecot, &sink, dir.path()).await;
    let bob = Agent::start(&relay, &tokens, "bob");
    bob.connected().await;
    let read = || relay.open_store().mailboxes().unwrap()[0].last_uid;
    dovecot.deliver("From: Ana <ana@example.org>\r\nTo: support@example.com\r\nSubject: One\r\n\r\nFirst\r\n").await;
    eventually(45, "the first mail, read by asking", || read() == 1).await;
    dovecot.deliver("From: Ana <ana@example.org>\r\nTo: support@example.com\r\nSubject: Two\r\n\r\nSecond\r\n").await;
    eventually(45, "the next mail, at the next time of asking", || read() == 2).await;
    let id = email_conversation(&bob).await;
    eventually(20, "both in Ana's conversation", || bob.message_texts(&id).len() == 2).await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mailbox_connected_for_the_first_time_brings_only_its_recent_mail() {
    let Setup { dovecot, sink: _sink, mut relay, bob, _dir } = setup(None).await;
    // A mail that arrived a month ago, then one of today.
    let day = sync_server::email::imap_date(Timestamp::now().0 - 30 * 86_400_000);
    let old = format!("{day:0>11} 10:00:00 +0000");
    dovecot
        .deliver_at(
            "From: Old <old@example.org>\r\nTo: support@example.com\r\nSubject: Last month\r\n\r\nAn old question\r\n",
            Some(&old),
        )
        .await;
    dovecot
        .deliver("From: New <new@example.org>\r\nTo: support@example.com\r\nSubject: Today\r\n\r\nA new question\r\n")
        .await;
    let id = email_conversation(&bob).await;
    assert_eq!(bob.with(|r| r.customer(&id)).unwrap().name, "New");
    eventually(10, "the new mail recorded", || relay.open_store().mailboxes().unwrap()[0].last_uid == 2).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let emails =
        bob.with(|r| r.stored_summaries().unwrap().into_iter().filter(|s| s.channel == Channel::Email).count());
    assert_eq!(emails, 1, "the month-old mail stays in the mailbox only");
    relay.stop().await;
}
