//! The world a run books into, made through the public API before the clock starts: one new
//! venue (so runs never disturb each other's data), the resources the mix needs, events, and
//! customer accounts.

use std::collections::HashMap;

use ::http::Method;
use anyhow::{Context, bail};
use jiff::{SignedDuration, Timestamp, ToSpan};
use serde_json::{Value, json};

use crate::http::{Conn, Target};
use crate::{Config, Op};

/// Holds last this long, longer than any run, so every acknowledged hold is still held when
/// the run is checked (a lapsed hold is not an oversell, but it would blur the check).
const HOLD_TTL_SECONDS: u32 = 24 * 3600;
/// Password of the generated customer accounts.
const CUSTOMER_PASSWORD: &str = "load-password-1";
/// Each show lasts this long; shows of the same seats follow each other.
const SHOW_HOURS: i64 = 2;

/// What the run books into. Ids are as the API returns them.
#[derive(Debug, Default)]
pub struct World {
    pub venue_id: String,
    /// Customers' access tokens; client `i` uses `customers[i % len]`.
    pub customers: Vec<String>,
    /// Their refresh tokens, in the same order.
    pub refresh_tokens: Vec<String>,
    pub seats: Vec<String>,
    pub shows: Vec<String>,
    pub hot_event: Option<String>,
    pub hot_seats: usize,
    /// The hot show's span in Unix seconds.
    pub hot_span: Option<(i64, i64)>,
    /// The general-admission resource and its event.
    pub ga: Option<(String, String)>,
    pub rooms: Vec<String>,
    pub doctors: Vec<String>,
    pub chargers: Vec<String>,
    /// Capacity of every resource made, by id.
    pub capacity: HashMap<String, u32>,
    /// Day 0 of date-based bookings: tomorrow (UTC, the venue's zone).
    pub first_day: jiff::civil::Date,
}

impl World {
    pub fn customer(&self, client: usize) -> &str {
        &self.customers[client % self.customers.len()]
    }
}

/// Makes the world for `config` on the server at `target`.
pub async fn build(target: &Target, config: &Config) -> anyhow::Result<World> {
    let mut api = Api { conn: Conn::new(target.clone()), token: None };
    let session = api
        .call(Method::POST, "/auth/login", json!({"email": config.admin_email, "password": config.admin_password}))
        .await
        .context(
            "logging in as the admin (--admin-email/--admin-password; start the server with --demo for the demo admin)",
        )?;
    api.token = Some(string(&session, "access_token")?);
    let run = uuid::Uuid::now_v7().as_simple().to_string();
    let venue = api
        .call(
            Method::POST,
            "/venues",
            json!({"name": format!("Load run {run}"), "category": "cinema", "location": {"lat": 52.5, "lon": 13.4},
                   "timezone": "UTC", "currency": "EUR", "policies": {"hold_ttl_seconds": HOLD_TTL_SECONDS}}),
        )
        .await?;
    let now = Timestamp::now();
    let mut world = World {
        venue_id: string(&venue, "id")?,
        first_day: now.to_zoned(jiff::tz::TimeZone::UTC).date().checked_add(1.day())?,
        ..World::default()
    };
    let uses = |op: Op| config.mix.iter().any(|(o, w)| *o == op && *w > 0);
    let show_base =
        Timestamp::from_second(now.as_second() / 3600 * 3600)?.checked_add(SignedDuration::from_hours(48))?;
    if uses(Op::HoldSeat) || uses(Op::SeatMap) || uses(Op::HoldHot) {
        world.seats = api.resources(&world.venue_id, config.seats, &mut world.capacity, seat_json).await?;
    }
    if uses(Op::HoldSeat) || uses(Op::SeatMap) {
        for i in 0..config.shows {
            let start = show_base.checked_add(SignedDuration::from_hours(SHOW_HOURS * i64::try_from(i)?))?;
            world.shows.push(api.event(&world.venue_id, &format!("Show {i}"), start, &world.seats).await?);
        }
    }
    if uses(Op::HoldHot) {
        world.hot_seats = config.hot_seats.min(world.seats.len());
        let start = show_base.checked_add(SignedDuration::from_hours(-24))?;
        let seats = &world.seats[..world.hot_seats];
        world.hot_event = Some(api.event(&world.venue_id, "Flash sale", start, seats).await?);
        world.hot_span = Some((start.as_second(), start.as_second() + SHOW_HOURS * 3600));
    }
    if uses(Op::HoldGa) {
        let ga = api.resources(&world.venue_id, 1, &mut world.capacity, ga_json).await?;
        let start = show_base.checked_add(SignedDuration::from_hours(-12))?;
        let event = api.event(&world.venue_id, "Festival", start, &ga).await?;
        world.ga = Some((ga[0].clone(), event));
    }
    if uses(Op::HoldNight) || uses(Op::Availability) {
        world.rooms = api.resources(&world.venue_id, config.rooms, &mut world.capacity, room_json).await?;
    }
    if uses(Op::HoldSlot) {
        world.doctors = api.resources(&world.venue_id, config.doctors, &mut world.capacity, doctor_json).await?;
    }
    if uses(Op::HoldCharger) || uses(Op::Availability) {
        world.chargers = api.resources(&world.venue_id, config.chargers, &mut world.capacity, charger_json).await?;
    }
    for k in 0..config.customers.max(1) {
        let email = format!("load-{run}-{k}@load.allot");
        api.call_anonymous(
            Method::POST,
            "/auth/register",
            json!({"email": email, "password": CUSTOMER_PASSWORD, "name": format!("Load {k}")}),
        )
        .await?;
        let session = api
            .call_anonymous(Method::POST, "/auth/login", json!({"email": email, "password": CUSTOMER_PASSWORD}))
            .await?;
        world.customers.push(string(&session, "access_token")?);
        world.refresh_tokens.push(string(&session, "refresh_token")?);
    }
    Ok(world)
}

/// Gives every customer a fresh session (`POST /auth/refresh`: no password hashing), for a
/// world built before the server's clock moved past its access tokens' lifetime.
pub async fn refresh_sessions(target: &Target, world: &mut World) -> anyhow::Result<()> {
    let mut api = Api { conn: Conn::new(target.clone()), token: None };
    for (access, refresh) in world.customers.iter_mut().zip(&mut world.refresh_tokens) {
        let session =
            api.call_anonymous(Method::POST, "/auth/refresh", json!({"refresh_token": refresh.as_str()})).await?;
        *access = string(&session, "access_token")?;
        *refresh = string(&session, "refresh_token")?;
    }
    Ok(())
}

fn seat_json(i: usize) -> (Value, u32) {
    let row = char::from(b'A' + u8::try_from(i / 20 % 26).unwrap_or(0));
    let category = if i.is_multiple_of(3) { "premium" } else { "standard" };
    (
        json!({"name": format!("{row}{}", i % 20 + 1), "capacity": 1, "unit_price": 1200,
               "attributes": {"row": row.to_string(), "number": i % 20 + 1, "category": category},
               "price_category": category, "time_model": {"kind": "events"}, "rules": {"max_advance_days": 1000}}),
        1,
    )
}

fn ga_json(_: usize) -> (Value, u32) {
    let capacity = 1_000_000;
    (
        json!({"name": "General admission", "capacity": capacity, "unit_price": 4500,
               "time_model": {"kind": "events"}, "rules": {"max_advance_days": 1000}}),
        capacity,
    )
}

fn room_json(i: usize) -> (Value, u32) {
    let capacity = 5;
    (
        json!({"name": format!("Room type {i}"), "capacity": capacity, "unit_price": 9000,
               "time_model": {"kind": "nights"}, "rules": {"max_advance_days": 1000}}),
        capacity,
    )
}

fn doctor_json(i: usize) -> (Value, u32) {
    (
        json!({"name": format!("Dr {i}"), "capacity": 1, "unit_price": 5000,
               "time_model": {"kind": "slots", "slot_minutes": 30,
                              "schedule": {"weekly": [{"days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"],
                                                       "open": "08:00", "close": "20:00"}]}},
               "rules": {"max_advance_days": 1000}}),
        1,
    )
}

fn charger_json(i: usize) -> (Value, u32) {
    (
        json!({"name": format!("Charger {i}"), "capacity": 1, "unit_price": 1200,
               "time_model": {"kind": "free", "step_minutes": 15, "min_minutes": 15, "max_minutes": 240},
               "rules": {"max_advance_days": 1000}}),
        1,
    )
}

fn string(v: &Value, field: &str) -> anyhow::Result<String> {
    v[field].as_str().map(str::to_owned).with_context(|| format!("no `{field}` in {v}"))
}

struct Api {
    conn: Conn,
    token: Option<String>,
}

impl Api {
    async fn call(&mut self, method: Method, path: &str, body: Value) -> anyhow::Result<Value> {
        let token = self.token.clone();
        self.request(method, path, token.as_deref(), body).await
    }

    async fn call_anonymous(&mut self, method: Method, path: &str, body: Value) -> anyhow::Result<Value> {
        self.request(method, path, None, body).await
    }

    async fn request(&mut self, method: Method, path: &str, token: Option<&str>, body: Value) -> anyhow::Result<Value> {
        let full = format!("/api/v1{path}");
        let answer = self.conn.send(method.clone(), &full, token, None, Some(serde_json::to_vec(&body)?)).await;
        let text = String::from_utf8_lossy(&answer.body);
        if !(200..300).contains(&answer.status) {
            bail!("{method} {full} answered {}: {text}", answer.status);
        }
        Ok(serde_json::from_slice(&answer.body)?)
    }

    async fn resources(
        &mut self,
        venue: &str,
        n: usize,
        capacity: &mut HashMap<String, u32>,
        body: fn(usize) -> (Value, u32),
    ) -> anyhow::Result<Vec<String>> {
        let mut ids = Vec::with_capacity(n);
        for i in 0..n {
            let (json, cap) = body(i);
            let id = string(&self.call(Method::POST, &format!("/venues/{venue}/resources"), json).await?, "id")?;
            capacity.insert(id.clone(), cap);
            ids.push(id);
        }
        Ok(ids)
    }

    async fn event(&mut self, venue: &str, name: &str, start: Timestamp, seats: &[String]) -> anyhow::Result<String> {
        let end = start.checked_add(SignedDuration::from_hours(SHOW_HOURS))?;
        let event = self
            .call(
                Method::POST,
                &format!("/venues/{venue}/events"),
                json!({"name": name, "start": start.to_string(), "end": end.to_string(), "seat_ids": seats,
                       "price_categories": {"standard": 1200, "premium": 1800}}),
            )
            .await?;
        string(&event, "id")
    }
}
