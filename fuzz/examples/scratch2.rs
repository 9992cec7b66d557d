use automerge::{ActorId, Automerge};
use crewdesk::domain::*;
use crewdesk::replica::{conversation, doc};
fn main() {
    let base = crewdesk_fuzz::bases().owned.clone();
    let mut attacker = Automerge::new().with_actor(ActorId::from([0xff; 16]));
    attacker
        .transact::<_, _, doc::DocError>(|tx| {
            doc::write_new(
                tx,
                &doc::NewConversation {
                    id: crewdesk_fuzz::DOC_ID.into(),
                    team: "sales".into(),
                    channel: Channel::Email,
                    customer: Customer {
                        id: CustomerId("evil".into()),
                        name: "x".into(),
                        email: Some("x@example.com".into()),
                        phone: None,
                        notes: None,
                    },
                    created_at: crewdesk_fuzz::NOW.plus(-1000),
                },
            )
        })
        .unwrap();
    let c = attacker.get_last_local_change().unwrap();
    let mut d = base.fork();
    println!("before: {:?} {}", doc::read_header(&d).unwrap(), doc::all_messages(&d).unwrap().len());
    let who = conversation::ChangeAuthor {
        agent: "bob".into(),
        team: "sales".into(),
        role: Role::Representative,
        mode: TeamMode::Grab,
        foreign_actors: vec![],
    };
    let v = conversation::apply_judged(&mut d, crewdesk_fuzz::DOC_ID, vec![c], &who, crewdesk_fuzz::NOW);
    println!("{:?}", (v.accepted.len(), v.refused.map(|r| r.1 .0)));
    println!("after: {:?} {:?}", doc::read_header(&d), doc::all_messages(&d).map(|m| m.len()));
}
