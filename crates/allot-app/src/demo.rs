//! The demo data of SPEC §8: one venue of every kind near Berlin and three accounts. Loading
//! is recorded in the database, so starting again with `--demo` changes nothing.

use std::collections::BTreeMap;

use allot_core::ids::{EventId, ResourceId, VenueId};
use allot_core::inventory::{
    CancellationPolicy, Currency, Event, Location, Resource, ResourceRules, Venue, VenuePolicies,
};
use allot_core::schedule::{Day, TimeOfDay, WeeklyHours, WeeklySchedule, add_days};
use allot_core::time_model::{FreeModel, NightsModel, SlotsModel, TimeModel};
use jiff::tz::TimeZone;

use crate::App;
use crate::auth::Principal;
use crate::error::{AppError, AppResult};
use crate::store::{PAGE_LIMIT_MAX, PageRequest, Role};

pub const DEMO_PASSWORD: &str = "demo-password";
pub const ADMIN_EMAIL: &str = "admin@demo.allot";
pub const MANAGER_EMAIL: &str = "manager@demo.allot";
pub const CUSTOMER_EMAIL: &str = "customer@demo.allot";
const TIMEZONE: &str = "Europe/Berlin";
const LOADED_MARKER: &str = "demo_loaded_on";

/// Loads the demo once and returns the text to print at start.
pub async fn load(app: &App) -> AppResult<String> {
    let today = app.clock.now().to_zoned(tz()).date().to_string();
    let stored = app.store.setting_or_insert(LOADED_MARKER, "loading").await?;
    if stored == "loading" {
        // Not loaded yet, or an earlier load was interrupted before its users and venues existed.
        if !demo_present(app).await? {
            load_all(app).await?;
        }
        app.store.set_setting(LOADED_MARKER, &today).await?;
    }
    Ok(format!(
        "Demo accounts (password '{DEMO_PASSWORD}'):\n  admin:    {ADMIN_EMAIL}\n  manager:  {MANAGER_EMAIL} (manages every demo venue)\n  customer: {CUSTOMER_EMAIL}"
    ))
}

async fn demo_present(app: &App) -> AppResult<bool> {
    Ok(app.store.user_by_email(ADMIN_EMAIL).await?.is_some()
        && !app.store.venues(PageRequest { after: None, limit: PAGE_LIMIT_MAX }).await?.items.is_empty())
}

fn tz() -> TimeZone {
    TimeZone::get(TIMEZONE).unwrap_or(TimeZone::UTC)
}

fn hm(h: u16, m: u16) -> TimeOfDay {
    TimeOfDay::from_minutes(h * 60 + m).unwrap_or(TimeOfDay::MIDNIGHT)
}

fn eur() -> Currency {
    Currency::try_from("EUR".to_owned()).unwrap_or_else(|_| unreachable!("EUR is a valid code"))
}

async fn user(app: &App, email: &str, name: &str, roles: Vec<Role>) -> AppResult<crate::store::User> {
    match app.store.user_by_email(email).await? {
        Some(u) => Ok(u),
        None => app.create_user(email, DEMO_PASSWORD, name, roles).await,
    }
}

async fn load_all(app: &App) -> AppResult<()> {
    let admin = user(app, ADMIN_EMAIL, "Demo Admin", vec![Role::Admin]).await?;
    let manager = user(app, MANAGER_EMAIL, "Demo Manager", vec![Role::Manager]).await?;
    user(app, CUSTOMER_EMAIL, "Demo Customer", vec![Role::Customer]).await?;
    let admin = Principal::of_user(&admin);
    let venues = [
        cinema(app, &admin).await?,
        hotel(app, &admin).await?,
        clinic(app, &admin).await?,
        charging(app, &admin).await?,
        studio(app, &admin).await?,
        airline(app, &admin).await?,
    ];
    for v in venues {
        app.store.set_manager(v, manager.id).await?;
    }
    Ok(())
}

fn venue(name: &str, category: &str, lat: f64, lon: f64, address: &str, amenities: &[&str], rating: f64) -> Venue {
    Venue {
        id: VenueId::new(),
        name: name.into(),
        category: category.into(),
        location: Location { lat, lon },
        address: address.into(),
        timezone: TIMEZONE.into(),
        currency: eur(),
        rating,
        amenities: amenities.iter().map(|s| (*s).to_owned()).collect(),
        policies: VenuePolicies { hold_ttl_seconds: 600, cancellation: CancellationPolicy::default() },
        managers: vec![],
    }
}

fn resource(
    venue: VenueId,
    name: &str,
    capacity: u32,
    unit_price: i64,
    attributes: String,
    time_model: TimeModel,
) -> Resource {
    Resource {
        id: ResourceId::new(),
        venue_id: venue,
        name: name.into(),
        capacity,
        unit_price,
        attributes,
        price_category: None,
        time_model,
        rules: ResourceRules::default(),
    }
}

/// Creates resources concurrently so the group-commit writer stores them in a few transactions.
async fn create_all(app: &App, admin: &Principal, resources: Vec<Resource>) -> AppResult<Vec<ResourceId>> {
    let ids = resources.iter().map(|r| r.id).collect();
    let mut tasks = Vec::with_capacity(resources.len());
    for r in resources {
        tasks.push(app.create_resource(admin, r));
    }
    for r in futures::future::join_all(tasks).await {
        r?;
    }
    Ok(ids)
}

fn seat_attributes(extra: &str, row: &str, number: u32, x: u32, y: u32, category: &str) -> String {
    format!(r#"{{{extra}"row":"{row}","number":{number},"x":{x},"y":{y},"category":"{category}"}}"#)
}

async fn cinema(app: &App, admin: &Principal) -> AppResult<VenueId> {
    let v = app
        .create_venue(
            admin,
            venue(
                "Allot Kino Mitte",
                "cinema",
                52.5251,
                13.4023,
                "Rosenthaler Str. 1, 10119 Berlin",
                &["parking", "bar", "accessible"],
                4.5,
            ),
        )
        .await?;
    let today = app.clock.now().to_zoned(tz()).date();
    let rows = ["A", "B", "C", "D", "E", "F", "G", "H", "I", "J"];
    for screen in 1..=2u32 {
        let mut seats = Vec::new();
        for (ri, row) in rows.iter().enumerate() {
            for n in 1..=12u32 {
                let category = if ri >= 8 { "premium" } else { "standard" };
                let attrs = seat_attributes(&format!(r#""screen":{screen},"#), row, n, n, ri as u32 + 1, category);
                let mut seat = resource(v.id, &format!("Screen {screen} {row}{n}"), 1, 1200, attrs, TimeModel::Events);
                seat.price_category = Some(category.into());
                seats.push(seat);
            }
        }
        let seat_ids = create_all(app, admin, seats).await?;
        let prices = BTreeMap::from([("standard".to_owned(), 1200), ("premium".to_owned(), 1800)]);
        let films = ["The Long Queue", "Overbooked", "Hold Please", "Last Seat Standing", "Group Commit"];
        let mut events = Vec::new();
        for day in 0..7 {
            let date = add_days(today, day);
            for (k, hour) in [10u16, 13, 16, 19, 22].into_iter().enumerate() {
                let start = hm(hour, 0).on(date, &tz());
                let end = start.checked_add(jiff::SignedDuration::from_mins(150)).unwrap_or(start);
                events.push(Event {
                    id: EventId::new(),
                    venue_id: v.id,
                    name: format!("{} (Screen {screen})", films[(k + screen as usize) % films.len()]),
                    start,
                    end,
                    seat_ids: seat_ids.clone(),
                    price_categories: prices.clone(),
                });
            }
        }
        create_events(app, admin, events).await?;
    }
    Ok(v.id)
}

async fn create_events(app: &App, admin: &Principal, events: Vec<Event>) -> AppResult<()> {
    let tasks: Vec<_> = events.into_iter().map(|e| app.create_event(admin, e)).collect();
    for r in futures::future::join_all(tasks).await {
        r?;
    }
    Ok(())
}

async fn hotel(app: &App, admin: &Principal) -> AppResult<VenueId> {
    let v = app
        .create_venue(
            admin,
            venue(
                "Allot Hotel Spree",
                "hotel",
                52.5163,
                13.3777,
                "Unter den Linden 77, 10117 Berlin",
                &["wifi", "breakfast", "spa"],
                4.2,
            ),
        )
        .await?;
    let nights = || {
        TimeModel::Nights(NightsModel {
            check_in_time: hm(15, 0),
            check_out_time: hm(11, 0),
            min_nights: 1,
            max_nights: 30,
        })
    };
    let mut standard =
        resource(v.id, "Standard Double", 20, 9900, r#"{"room_type":"standard","beds":"double"}"#.into(), nights());
    standard.rules.overbooking_percent = 5;
    let deluxe = resource(v.id, "Deluxe King", 10, 15900, r#"{"room_type":"deluxe","beds":"king"}"#.into(), nights());
    let suite = resource(v.id, "Spree Suite", 2, 34900, r#"{"room_type":"suite","beds":"king"}"#.into(), nights());
    create_all(app, admin, vec![standard, deluxe, suite]).await?;
    Ok(v.id)
}

fn weekly(days: &[Day], open: u16, close: u16) -> WeeklySchedule {
    WeeklySchedule {
        weekly: vec![WeeklyHours { days: days.to_vec(), open: hm(open, 0), close: hm(close, 0) }],
        exceptions: vec![],
    }
}

async fn clinic(app: &App, admin: &Principal) -> AppResult<VenueId> {
    let v = app
        .create_venue(
            admin,
            venue(
                "Allot Praxis am Park",
                "clinic",
                52.5096,
                13.3759,
                "Potsdamer Platz 5, 10785 Berlin",
                &["accessible"],
                4.7,
            ),
        )
        .await?;
    let slots =
        || TimeModel::Slots(SlotsModel { slot_minutes: 30, schedule: weekly(&Day::WEEKDAYS, 9, 17), max_slots: 4 });
    let mut doctors = vec![
        resource(
            v.id,
            "Dr. Anna Weber (general practice)",
            1,
            6000,
            r#"{"specialty":"general practice"}"#.into(),
            slots(),
        ),
        resource(v.id, "Dr. Jonas Becker (dermatology)", 1, 8000, r#"{"specialty":"dermatology"}"#.into(), slots()),
        resource(
            v.id,
            "Dr. Lea Schulz (physiotherapy, two patients per slot)",
            2,
            4500,
            r#"{"specialty":"physiotherapy"}"#.into(),
            slots(),
        ),
    ];
    for d in &mut doctors {
        d.rules.min_notice_minutes = 60;
    }
    create_all(app, admin, doctors).await?;
    Ok(v.id)
}

async fn charging(app: &App, admin: &Principal) -> AppResult<VenueId> {
    let v = app
        .create_venue(
            admin,
            venue(
                "Allot Charging Hub Alexanderplatz",
                "charging",
                52.5219,
                13.4132,
                "Alexanderplatz 3, 10178 Berlin",
                &["24/7", "cafe"],
                4.1,
            ),
        )
        .await?;
    let free = || TimeModel::Free(FreeModel { step_minutes: 15, min_minutes: 15, max_minutes: 240, schedule: None });
    let connectors = (1..=6)
        .map(|n| {
            let kind = if n <= 2 {
                "CCS 150 kW"
            } else if n <= 4 {
                "CCS 50 kW"
            } else {
                "Type 2 22 kW"
            };
            let mut r = resource(
                v.id,
                &format!("Connector {n} ({kind})"),
                1,
                1200,
                format!(r#"{{"connector":"{kind}"}}"#),
                free(),
            );
            r.rules.buffer_after_minutes = 5;
            r
        })
        .collect();
    create_all(app, admin, connectors).await?;
    Ok(v.id)
}

async fn studio(app: &App, admin: &Principal) -> AppResult<VenueId> {
    let v = app
        .create_venue(
            admin,
            venue("Allot Studio Kreuzberg", "studio", 52.4986, 13.4030, "Oranienstr. 20, 10999 Berlin", &["wifi"], 4.8),
        )
        .await?;
    let days = [Day::Mon, Day::Tue, Day::Wed, Day::Thu, Day::Fri, Day::Sat];
    let hourly = || TimeModel::Slots(SlotsModel { slot_minutes: 60, schedule: weekly(&days, 10, 18), max_slots: 3 });
    create_all(
        app,
        admin,
        vec![
            resource(v.id, "Mia Fischer (photographer)", 1, 8000, r#"{"profession":"photographer"}"#.into(), hourly()),
            resource(
                v.id,
                "Noah Wagner (sound engineer)",
                1,
                7000,
                r#"{"profession":"sound engineer"}"#.into(),
                hourly(),
            ),
        ],
    )
    .await?;
    Ok(v.id)
}

async fn airline(app: &App, admin: &Principal) -> AppResult<VenueId> {
    let v = app
        .create_venue(
            admin,
            venue("Allot Air (BER)", "airline", 52.3667, 13.5033, "Flughafen BER, 12529 Schönefeld", &["lounge"], 3.9),
        )
        .await?;
    let letters = ["A", "B", "C", "D", "E", "F"];
    let mut seats = Vec::new();
    for row in 1..=30u32 {
        for (i, l) in letters.iter().enumerate() {
            let category = if row <= 5 { "business" } else { "economy" };
            let attrs = seat_attributes("", &row.to_string(), i as u32 + 1, i as u32 + 1, row, category);
            let mut seat = resource(v.id, &format!("Seat {row}{l}"), 1, 9900, attrs, TimeModel::Events);
            seat.price_category = Some(category.into());
            seats.push(seat);
        }
    }
    let seat_ids = create_all(app, admin, seats).await?;
    let today = app.clock.now().to_zoned(tz()).date();
    let prices = BTreeMap::from([("business".to_owned(), 34900), ("economy".to_owned(), 9900)]);
    let routes = [("BER → MUC", 7, 70), ("MUC → BER", 10, 70), ("BER → LHR", 13, 120), ("LHR → BER", 17, 115)];
    let mut flights = Vec::new();
    for day in [1, 2, 4, 6] {
        for (k, (route, hour, minutes)) in routes.iter().enumerate() {
            let start = hm(*hour, 0).on(add_days(today, day), &tz());
            flights.push(Event {
                id: EventId::new(),
                venue_id: v.id,
                name: format!("AL{} {route}", 100 + k),
                start,
                end: start
                    .checked_add(jiff::SignedDuration::from_mins(*minutes))
                    .map_err(|e| AppError::Internal(e.to_string()))?,
                seat_ids: seat_ids.clone(),
                price_categories: prices.clone(),
            });
        }
    }
    create_events(app, admin, flights).await?;
    Ok(v.id)
}
