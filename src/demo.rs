//! Demo data: two teams (Sales in open mode, Support in grab mode), admins and representatives,
//! customers on every channel and conversations in every status. The run command shows it and the
//! benchmarks use it at scale (10k conversations, 500k messages).

use crate::domain::{
    AgentId, Author, Channel, ConversationId, Customer, CustomerId, Member, Message, MessageBody, MessageId,
    MessageTemplate, Presence, Role, Team, TeamId, TeamMode, Thresholds, Timestamp, WhatsAppTemplate,
};
use crate::replica::doc::{self, DocError, NewConversation};
use crate::replica::{Replica, ReplicaError};
use automerge::{ActorId, Automerge};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub const SALES: &str = "sales";
pub const SUPPORT: &str = "support";

/// The demo agents: (id, name, [(team, role)]).
/// A demo agent: id, display name, and role per team.
pub type DemoAgent = (&'static str, &'static str, &'static [(&'static str, Role)]);

pub const AGENTS: &[DemoAgent] = &[
    ("ada", "Ada Lindqvist", &[(SALES, Role::Admin), (SUPPORT, Role::Admin)]),
    ("bob", "Bob Okafor", &[(SALES, Role::Representative), (SUPPORT, Role::Representative)]),
    ("carol", "Carol Mendes", &[(SALES, Role::Representative)]),
    ("dave", "Dave Kim", &[(SUPPORT, Role::Representative)]),
    ("erin", "Erin Walsh", &[(SUPPORT, Role::Representative), (SALES, Role::Admin)]),
];

pub fn teams() -> Vec<Team> {
    [(SALES, "Sales", TeamMode::Open), (SUPPORT, "Support", TeamMode::Grab)]
        .into_iter()
        .map(|(id, name, mode)| Team {
            id: TeamId::from(id),
            name: name.to_owned(),
            mode,
            thresholds: Thresholds::default(),
            members: AGENTS
                .iter()
                .filter_map(|(agent, agent_name, roles)| {
                    roles.iter().find(|(t, _)| *t == id).map(|(_, role)| Member {
                        agent: AgentId::from(*agent),
                        name: (*agent_name).to_owned(),
                        role: *role,
                    })
                })
                .collect(),
            templates: vec![
                MessageTemplate {
                    name: "Greeting".into(),
                    text: "Hi {name}, thanks for reaching out! I'm {agent} and I'll help you today.".into(),
                },
                MessageTemplate {
                    name: "Follow-up".into(),
                    text: "Hi {name}, just checking in: is there anything else we can do for you?".into(),
                },
                MessageTemplate {
                    name: "Closing".into(),
                    text: "Thanks {name}! I'm closing this conversation; write any time to reopen it.".into(),
                },
            ],
            whatsapp_templates: vec![
                WhatsAppTemplate {
                    name: "order_update".into(),
                    language: "en_US".into(),
                    body: "Hello {{1}}, your order {{2}} has an update. Reply to continue the conversation.".into(),
                },
                WhatsAppTemplate {
                    name: "reconnect".into(),
                    language: "en_US".into(),
                    body: "Hi {{1}}, we replied to your question. Reply here to pick up where we left off.".into(),
                },
            ],
            conference_base: None,
        })
        .collect()
}

const FIRST: &[&str] = &[
    "Maya", "Liam", "Sofia", "Noah", "Aiko", "Mateo", "Zara", "Jonas", "Priya", "Omar", "Lena", "Kofi", "Ines",
    "Tariq", "Elif", "Yuki",
];
const LAST: &[&str] = &[
    "Hansen", "Rossi", "Nakamura", "Silva", "Novak", "Dubois", "Haddad", "Schmidt", "Moreau", "Olsen", "Costa", "Reyes",
];
const CUSTOMER_LINES: &[&str] = &[
    "Hi, I can't log in to my account since this morning.",
    "Is the premium plan billed monthly or yearly?",
    "My order hasn't arrived yet, can you check the tracking?",
    "How do I add a second user to our workspace?",
    "The invoice shows the wrong company name.",
    "Do you ship to Norway?",
    "I was charged twice for the same order.",
    "Can I change the delivery address?",
    "Thanks, that worked!",
    "Could you send me the setup guide again?",
];
const CREW_LINES: &[&str] = &[
    "Thanks for writing! Let me look into that for you.",
    "I've checked your account: could you confirm your email address?",
    "That's fixed now. Anything else I can help with?",
    "I've sent the guide to your email.",
    "Our team is on it; you'll hear from us within the hour.",
];

/// What the scenario of one demo conversation ends in, relative to `now`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    /// A customer waits 7 minutes and nobody is in the room: Overdue + Rep Needed.
    OverdueNoCrew,
    /// A customer waits 4 minutes with crew in the room: Soon to be + Pending.
    SoonWithCrew,
    /// A customer just wrote, crew in the room: Pending.
    FreshWithCrew,
    /// A customer just wrote, nobody in the room, web widget online: Online + Rep Needed.
    FreshOnline,
    /// The crew answered last: nobody waits.
    Answered,
    /// Closed with CLOSE after the crew's last reply.
    ClosedByHand,
    /// No customer message for 30 hours: closed automatically.
    ClosedBySilence,
}

const SCENARIOS: [Scenario; 7] = [
    Scenario::OverdueNoCrew,
    Scenario::SoonWithCrew,
    Scenario::FreshWithCrew,
    Scenario::FreshOnline,
    Scenario::Answered,
    Scenario::ClosedByHand,
    Scenario::ClosedBySilence,
];

/// How much demo data to make.
#[derive(Clone, Debug)]
pub struct DemoSpec {
    pub conversations: usize,
    /// Messages per conversation (at least 2).
    pub messages_per_conversation: usize,
    pub seed: u64,
}

impl Default for DemoSpec {
    /// The run command's demo: every status on every channel for both teams.
    fn default() -> Self {
        DemoSpec { conversations: 42, messages_per_conversation: 6, seed: 7 }
    }
}

/// One generated conversation: its document and, for web-widget customers, their presence.
pub struct DemoConversation {
    pub id: ConversationId,
    pub document: Automerge,
    pub presence: Option<Presence>,
}

/// The id of demo conversation `i`: a valid automerge-repo document id, stable across runs.
pub fn conversation_id(i: usize) -> ConversationId {
    let mut bytes = *b"crewdesk-demo\0\0\0";
    bytes[12..16].copy_from_slice(&(i as u32).to_be_bytes());
    ConversationId(crate::sync::document_id::encode(&bytes))
}

/// Generates the demo conversations (deterministic for a seed and `now`).
pub fn conversations(spec: &DemoSpec, now: Timestamp) -> Result<Vec<DemoConversation>, DocError> {
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let actor = ActorId::from(b"crewdesk-demo".as_slice());
    let teams = teams();
    let mut out = Vec::with_capacity(spec.conversations);
    for i in 0..spec.conversations {
        let scenario = SCENARIOS[i % SCENARIOS.len()];
        let team = &teams[(i / SCENARIOS.len()) % teams.len()];
        let channel = Channel::ALL[(i / (SCENARIOS.len() * teams.len())) % Channel::ALL.len()];
        let channel = if scenario == Scenario::FreshOnline { Channel::WebWidget } else { channel };
        let first = FIRST[rng.random_range(0..FIRST.len())];
        let last = LAST[rng.random_range(0..LAST.len())];
        let customer = Customer {
            id: CustomerId(format!("cust-{i:05}")),
            name: format!("{first} {last}"),
            email: (channel != Channel::WhatsApp || i % 2 == 0)
                .then(|| format!("{}.{}{}@example.com", first.to_lowercase(), last.to_lowercase(), i)),
            phone: (channel == Channel::WhatsApp || i % 3 == 0)
                .then(|| format!("+47 4{:03} {:04}", i % 1000, (i * 7919) % 10000)),
            notes: None,
        };
        // The crew member this conversation is handled by, if any (a representative of the team).
        let reps: Vec<&AgentId> =
            team.members.iter().filter(|m| m.role == Role::Representative).map(|m| &m.agent).collect();
        let handler = reps[i % reps.len()].clone();

        let n = spec.messages_per_conversation.max(2);
        let last_customer_ago = match scenario {
            Scenario::OverdueNoCrew => 7 * Timestamp::MINUTE,
            Scenario::SoonWithCrew => 4 * Timestamp::MINUTE,
            Scenario::FreshWithCrew | Scenario::FreshOnline => 40 * Timestamp::SECOND,
            Scenario::Answered => 20 * Timestamp::MINUTE,
            Scenario::ClosedByHand => 3 * Timestamp::HOUR,
            Scenario::ClosedBySilence => 30 * Timestamp::HOUR,
        };
        let customer_last = now.plus(-last_customer_ago - (i as i64 % 13) * Timestamp::SECOND);
        let crew_last = matches!(scenario, Scenario::Answered | Scenario::ClosedByHand | Scenario::ClosedBySilence);
        let created_at = customer_last.plus(-(n as i64) * 2 * Timestamp::MINUTE);
        let id = conversation_id(i);
        let mut d = doc::create(
            actor.clone(),
            &NewConversation { id: id.clone(), team: team.id.clone(), channel, customer: customer.clone(), created_at },
        )?;
        d.transact::<_, _, DocError>(|tx| {
            for k in 0..n {
                // The newest message is the customer's (or the crew's reply after it); older ones alternate.
                let from_end = n - 1 - k;
                let (author, at) = match (from_end, crew_last) {
                    (0, true) => (doc::crew(&handler), customer_last.plus(90 * Timestamp::SECOND)),
                    (0, false) => (Author::Customer, customer_last),
                    (1, true) => (Author::Customer, customer_last),
                    _ => {
                        let author =
                            if from_end % 2 == usize::from(crew_last) { Author::Customer } else { doc::crew(&handler) };
                        (author, customer_last.plus(-(from_end as i64) * 2 * Timestamp::MINUTE))
                    }
                };
                let lines = if author == Author::Customer { CUSTOMER_LINES } else { CREW_LINES };
                let text = lines[(i + k) % lines.len()].to_owned();
                let message =
                    Message { id: MessageId(format!("{id}-m{k:05}")), at, author, body: MessageBody::Text { text } };
                doc::add_message(tx, &message)?;
            }
            let in_room = matches!(scenario, Scenario::SoonWithCrew | Scenario::FreshWithCrew | Scenario::Answered);
            if team.mode == TeamMode::Grab {
                if in_room || crew_last {
                    doc::record_owner(tx, &handler)?;
                }
                if !in_room {
                    doc::set_in_room(tx, &handler, false)?;
                }
            } else if in_room {
                doc::set_in_room(tx, &handler, true)?;
            }
            if scenario == Scenario::ClosedByHand {
                doc::close(tx, customer_last.plus(5 * Timestamp::MINUTE))?;
            }
            Ok(())
        })
        .map_err(|f| f.error)?;
        let presence = (channel == Channel::WebWidget).then(|| Presence {
            online: scenario == Scenario::FreshOnline,
            last_active: Some(customer_last),
            location: Some(["Oslo, Norway", "Lisbon, Portugal", "Osaka, Japan", "Nairobi, Kenya"][i % 4].to_owned()),
        });
        out.push(DemoConversation { id, document: d, presence });
    }
    Ok(out)
}

/// A demo conversation saved: its id, its document's bytes and its web-widget customer's presence.
pub type SavedConversation = (ConversationId, Vec<u8>, Option<Presence>);

/// Saves generated conversations, ready for a replica ([`load`]) or a relay's store.
pub fn save(generated: Vec<DemoConversation>) -> Vec<SavedConversation> {
    generated.into_iter().map(|c| (c.id, c.document.save(), c.presence)).collect()
}

/// Fills a replica with the demo teams and conversations.
pub fn fill(replica: &mut Replica, spec: &DemoSpec, now: Timestamp) -> Result<usize, ReplicaError> {
    load(replica, &save(conversations(spec, now)?))?;
    Ok(spec.conversations)
}

/// Loads the demo teams and saved demo conversations into a replica (500 conversations per
/// transaction), as a desk that was in sync with a relay holding the same conversations.
pub fn load(replica: &mut Replica, saved: &[SavedConversation]) -> Result<(), ReplicaError> {
    for team in teams() {
        replica.put_team(team)?;
    }
    for batch in saved.chunks(500) {
        replica.import_documents(batch.iter().map(|(id, bytes, _)| (id.clone(), bytes.clone())))?;
    }
    for (id, _, presence) in saved {
        if let Some(p) = presence {
            replica.set_presence(id, p.clone())?;
        }
    }
    Ok(())
}

/// One long demo conversation of `messages` messages with the id of demo conversation `index`
/// (the benchmarks open it).
pub fn long_conversation(index: usize, messages: usize, now: Timestamp) -> Result<DemoConversation, DocError> {
    let spec = DemoSpec { conversations: 1, messages_per_conversation: messages, seed: 2 };
    let mut c = conversations(&spec, now)?.pop().ok_or_else(|| DocError::Malformed("no conversation".into()))?;
    c.id = conversation_id(index);
    c.document
        .transact::<_, _, automerge::AutomergeError>(|tx| {
            use automerge::transaction::Transactable;
            tx.put(automerge::ROOT, "id", c.id.as_str())?;
            Ok(())
        })
        .map_err(|f| DocError::from(f.error))?;
    Ok(c)
}

/// Activity made elsewhere (for the desk benchmark): the customer writes again in a demo
/// conversation. Returns the change's bytes, to append to the document wherever it is stored.
pub fn follow_up(document: &mut Automerge, k: usize, at: Timestamp) -> Result<Vec<u8>, DocError> {
    let heads = document.get_heads();
    let id = doc::read_header(document)?.id;
    document.set_actor(ActorId::from(format!("crewdesk-demo-follow-up-{k}").as_bytes()));
    let message = Message {
        id: MessageId(format!("{id}-f{k:05}")),
        at,
        author: Author::Customer,
        body: MessageBody::Text { text: CUSTOMER_LINES[k % CUSTOMER_LINES.len()].to_owned() },
    };
    document.transact::<_, _, DocError>(|tx| doc::add_message(tx, &message)).map_err(|f| f.error)?;
    Ok(document.save_after(&heads))
}
