"""Generate the example chat datasets under examples/data/ (stdlib only, deterministic).

    python examples/make_datasets.py                # write examples/data/<task>/{train,test}.jsonl
    python examples/make_datasets.py --check        # regenerate in memory, compare with the files

Three narrow tasks of different kinds (see examples/data/README.md):

- ``tickets``          support ticket -> one of 8 department names (system prompt on every row)
- ``intent_slots``     smart-home / assistant command -> ``intent=...; field=value; ...``
- ``sentiment_aspect`` product review -> ``<sentiment>, <aspect>`` (no system prompt)

User texts are built compositionally: openers, core sentences, extra details, closers, slot
fillers, politeness, typos and casing noise. Every pool of phrasings (core templates, openers,
details, closers, context sentences) is split *by template* between train and test, so each
test sentence is phrased in a way never seen in training. Answers are fully determined by the
text and short, so exact match is meaningful.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path
from random import Random

DEFAULT_SEED = 20240601
TEST_FRACTION = 0.3  # share of every phrasing pool kept for the test split only

# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
WEEKDAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]


def num_words(n: int) -> str:
    """English words for 0 <= n < 100 ("twenty-one")."""
    if n < 20:
        return _ONES[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens] + ("" if ones == 0 else "-" + _ONES[ones])


def split_pool(name: str, items: list, seed: int, frac: float = TEST_FRACTION) -> dict:
    """Split a pool of phrasings into disjoint train/test parts (at least one of each)."""
    rng = Random(f"{seed}/{name}")
    order = list(range(len(items)))
    rng.shuffle(order)
    n_test = max(1, round(len(items) * frac))
    if len(items) - n_test < 1:
        raise ValueError(f"pool {name} too small to split: {len(items)}")
    test_idx = set(order[:n_test])
    return {
        "train": [x for i, x in enumerate(items) if i not in test_idx],
        "test": [x for i, x in enumerate(items) if i in test_idx],
    }


_PLACEHOLDER = re.compile(r"(\{\w+\})")
_WORD = re.compile(r"[A-Za-z]{4,}")


def _typo(word: str, rng: Random) -> str:
    i = rng.randrange(1, len(word) - 1)
    op = rng.choice(["swap", "drop", "double"])
    if op == "swap":
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if op == "drop":
        return word[:i] + word[i + 1 :]
    return word[:i] + word[i] + word[i:]


_ABBREV = {"please": "pls", "thanks": "thx", "you": "u", "because": "cause"}


def text_noise(template: str, rng: Random, typo_p: float, abbrev_p: float) -> str:
    """Typos / chat abbreviations on the literal words of a template, never inside placeholders
    (so slot values stay exact)."""
    parts = _PLACEHOLDER.split(template)
    literal = [i for i, p in enumerate(parts) if not _PLACEHOLDER.fullmatch(p)]
    if rng.random() < abbrev_p:
        for i in literal:
            parts[i] = re.sub(
                r"\b(please|thanks|you|because)\b",
                lambda m: _ABBREV[m.group(1)],
                parts[i],
            )
    if rng.random() < typo_p:
        spots = [(i, m.start(), m.end()) for i in literal for m in _WORD.finditer(parts[i])]
        for i, s, e in sorted(rng.sample(spots, min(len(spots), rng.choice([1, 1, 2]))))[::-1]:
            parts[i] = parts[i][:s] + _typo(parts[i][s:e], rng) + parts[i][e:]
    return "".join(parts)


def case_noise(text: str, rng: Random, lower_p: float, upper_p: float, nopunct_p: float) -> str:
    r = rng.random()
    if r < lower_p:
        text = text.lower()
    elif r < lower_p + upper_p:
        text = text.upper()
    if rng.random() < nopunct_p and text[-1] in ".!":
        text = text[:-1]
    return text


def join_parts(parts: list[str]) -> str:
    """Join sentence pieces; a piece after a comma-ending piece starts lower case (unless 'I')."""
    out = ""
    for p in parts:
        if not p:
            continue
        if out:
            if out.endswith(",") and not re.match(r"I\b|\{", p):
                p = p[0].lower() + p[1:]
            out += " "
        out += p
    return out


def sentence_case(text: str) -> str:
    """Capitalize the first letter of the text and of each sentence."""
    text = re.sub(r"^([a-z])", lambda m: m.group(1).upper(), text)
    return re.sub(r"(?<![ap]\.m)([.!?] )([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)


def _article(m: re.Match) -> str:
    a, word = m.group(1), m.group(2)
    w = word.lower()
    an = (w[0] in "aeiou" and not w.startswith(("one", "uni", "use", "eu"))) or bool(
        re.match(r"(hour|8|11\b|18\b)", w)
    )
    return (a + "n" if an else a) + " " + word


def fill(template: str, values: dict) -> str:
    """Fill {placeholders}, then fix 'a' -> 'an' where the filled-in word needs it."""
    text = _PLACEHOLDER.sub(lambda m: str(values[m.group(1)[1:-1]]), template)
    return re.sub(r"\b([Aa]) ([\w'-]+)", _article, text)


def n_words(text: str) -> int:
    return len(text.split())


# --------------------------------------------------------------------------------------------
# Task 1: tickets -> department
# --------------------------------------------------------------------------------------------

TICKETS_SYSTEM = (
    "Route the customer ticket to one department. Answer with the department name only: "
    "billing, technical_support, shipping, returns, account_access, sales, cancellation "
    "or feedback."
)

TICKET_CORES = {
    "billing": [
        "I was charged twice for my {plan} this month.",
        "My latest invoice shows {amount} but my plan is supposed to cost {amount2}.",
        "There's a charge of {amount} on my card statement from you that I don't recognize.",
        "Can you send me a VAT invoice for my last payment? Our accountant needs it.",
        "I need to update the credit card on file because my old one expired.",
        "Why did my monthly bill go up by {amount} without any notice?",
        "My payment keeps getting declined on your site even though the card works everywhere else.",
        "I was billed for the {plan} after I had already switched to a cheaper one.",
        "The promo discount wasn't applied to my last statement, I paid full price.",
        "Can I change my payment date to the {date} of each month? My salary comes in later.",
        "I paid by bank transfer on {day} but my account still shows an outstanding balance of {amount}.",
        "I got a late payment fee but I paid on time and I have the receipt.",
        "Please explain the line called 'service adjustment' on my invoice.",
        "My statement lists two subscriptions but I only have one.",
        "I'd like to pay with PayPal instead of my debit card from now on.",
        "The amount taken from my account was {amount}, not the {amount2} I was quoted.",
        "I need copies of all my receipts from last year for my taxes.",
        "You charged my card {amount} for a 'device protection fee' that I never signed up for.",
        "My direct debit failed and now there's a warning about an unpaid balance.",
        "Is it possible to split my monthly bill between two cards?",
        "I think I was overcharged on my last invoice, the tax looks wrong.",
        "The company name on my invoices is wrong, it should say {company}.",
        "I was charged in euros instead of dollars and my bank added a conversion fee.",
        "Autopay took money out of my account twice this month.",
    ],
    "technical_support": [
        "My {product} keeps dropping the connection every few minutes.",
        "{app} crashes as soon as I open it.",
        "The {product} won't turn on anymore, the light just blinks orange.",
        "I get error {error} whenever I try to sync my devices.",
        "The firmware update got stuck at {pct}% and now the {product} is unresponsive.",
        "My internet is way slower than it should be, I'm getting {speed} Mbps instead of {speed2}.",
        "The {product} doesn't show up in the app when I try to pair it.",
        "After the latest update, {app} freezes on the loading screen.",
        "My {product} keeps rebooting by itself several times a day.",
        "I can't get the {product} to connect to my 5GHz network.",
        "The video feed from my security camera is just a black screen.",
        "My wireless printer says it's offline even though it's on the same network.",
        "How do I factory reset the {product}? Holding the button does nothing.",
        "The {product} gets really hot and then shuts itself down.",
        "Notifications from {app} stopped coming through completely.",
        "I followed the setup guide but the {product} is stuck on step 3 and never finishes.",
        "Wi-Fi works on my laptop but not on my phone since you replaced my {product}.",
        "The voice assistant on my smart speaker doesn't respond to commands anymore.",
        "{app} shows a blank white page and nothing loads.",
        "The {product} lost all its settings after a power cut and I can't configure it again.",
        "Streaming keeps buffering even though the speed test looks fine.",
        "The status light on my {product} is solid red and nothing works.",
        "The smart thermostat ignores the schedule I set and heats at random times.",
        "The ethernet port on my {product} seems dead, nothing happens when I plug a cable in.",
    ],
    "shipping": [
        "My order {order} still hasn't arrived and it's been {n} days.",
        "The tracking for order {order} hasn't updated since {day}.",
        "The courier says my package was delivered but there is nothing at my door.",
        "Can I change the delivery address for order {order}? I'm moving this week.",
        "When will order {order} be dispatched? The website still says processing.",
        "How long does standard delivery usually take to {country}?",
        "My parcel is stuck at customs, what do I need to do?",
        "The tracking number you emailed me for {order} doesn't work on the carrier's site.",
        "Only one of the two boxes from my order arrived, where is the other one?",
        "Can I pick up my order at the depot instead of waiting for another delivery attempt?",
        "The driver left a note saying they couldn't deliver, how do I rearrange it?",
        "I chose next-day delivery but the estimate now says {day}.",
        "My package was sent to my old address, can you redirect it?",
        "The delivery estimate for {order} keeps moving back every day.",
        "Can my parcel be left with a neighbour? I won't be home on {day}.",
        "The carrier marked {order} as lost in transit, what happens now?",
        "Which courier is bringing order {order}? I need to arrange access to my building.",
        "The parcel went to a pickup locker miles from my home instead of my address.",
        "It says my order shipped on {day} but no tracking number was ever sent.",
        "Could you hold my order until I'm back from holiday on the {date}?",
        "My neighbour received my package by mistake and now they're away.",
        "Can you combine my two recent orders into one delivery?",
        "My order was due yesterday and the tracking page now just says 'exception'.",
        "Do you offer Saturday delivery? I work weekdays and keep missing the driver.",
    ],
    "returns": [
        "I'd like to send back the {product} I bought last week, it's not what I expected.",
        "How do I get a return label for order {order}?",
        "The {product} arrived with a cracked case and I want a replacement.",
        "I sent the item back {n} days ago but still haven't received my refund.",
        "Can I exchange the {product} for the newer model? I haven't opened the box.",
        "You sent me the wrong item, I ordered a {product} and got a {product2}. How do I swap it?",
        "What's your return window? I bought a {product} {n} days ago and changed my mind.",
        "The {product} stopped working after two weeks and I'd rather return it than have it repaired.",
        "I dropped off the return at the post office, can you confirm you got it?",
        "Do I need the original packaging to return the {product}?",
        "The return portal says my order is not eligible for a return, why?",
        "I received a {product} as a gift and would like to exchange it for store credit.",
        "My refund for the returned {product} was less than what I paid.",
        "Can someone collect the {product} from my house? It's too heavy to take back to the shop.",
        "One of the items in my order is faulty, can I return just that one?",
        "I'd like to swap the {color} one I received for a {color2} one.",
        "The return label you sent me has the wrong address on it.",
        "I ordered two {product}s by accident and need to send one back.",
        "The box was already opened when it arrived and parts are missing, I want to return it.",
        "Is there a restocking fee if I return the {product}?",
        "I returned my order a month ago and the status still says 'awaiting item'.",
        "The {product} is too big for my shelf, I'd like to give it back for a refund.",
        "Can I return something I bought in one of your stores through the website?",
        "I'm not happy with the {product}, please tell me how to return it for a full refund.",
    ],
    "account_access": [
        "I can't log in, it says my password is incorrect even after resetting it.",
        "The password reset email never arrives in my inbox.",
        "My account got locked after too many attempts.",
        "I'm not receiving the two-factor code on my phone anymore.",
        "I got a new phone number and now I can't get the verification text to sign in.",
        "Someone changed the email on my account and I can't sign in anymore.",
        "I forgot my username, how do I find it?",
        "Every time I enter my details the sign-in screen just reloads and I never get into my account.",
        "I think my account was hacked, there are logins from a country I've never been to.",
        "I need to change the email address I use to sign in.",
        "My authenticator app was on my old phone which I lost, how do I get back in?",
        "The reset link says it has expired every time I click it.",
        "I can't remember which email I used to register.",
        "It says 'account suspended' when I try to sign in, what did I do?",
        "I'd like to turn on two-step verification but the option is greyed out.",
        "Can you unlock my profile? I was locked out by mistake.",
        "The answers to my security questions don't seem to be accepted anymore.",
        "I keep getting 'invalid credentials' even though I'm pasting the password from my password manager.",
        "My kid typed the wrong PIN too many times and now my account is frozen.",
        "I want to log out all devices because I shared my password with an ex.",
        "The sign-in code expires before I can even type it in.",
        "I created my account with Google sign-in and now I can't get in with my email.",
        "I never received the activation email so I can't access my new account.",
        "My login worked yesterday and today it says the user doesn't exist.",
    ],
    "sales": [
        "Do you offer discounts for buying {n} {product}s for our office?",
        "What's the difference between the {plan} and the {plan2}? I'm thinking of signing up.",
        "Will the {product} be back in stock soon? I'd like to buy one.",
        "Can I get a quote for equipping a small business with {n} {product}s?",
        "Are there any bundle deals if I buy the {product} and the {product2} together?",
        "I run a school and we're interested in an education discount.",
        "Before I order, does the {product} come with a warranty?",
        "Which {product} would you recommend for a three-bedroom house?",
        "Will the {product} be on sale for Black Friday?",
        "I'm interested in moving up from the {plan} to the {plan2}, what extras would I get?",
        "Do you have a reseller program? We'd like to stock your products in our shop.",
        "Can I try the {product} before committing to buy it?",
        "Is there a student price for the {plan}?",
        "I'm comparing you with another provider, can you match their price of {amount}?",
        "How many devices could I add on the {plan} if I sign up today?",
        "Is the {product} compatible with Apple HomeKit? I'm deciding whether to buy it.",
        "We need {n} licences for our team, who can I talk to about a volume deal?",
        "Are you planning to sell a {color} version of the {product}?",
        "What's the cheapest plan that includes the security features?",
        "Do you sell refurbished {product}s at a lower price?",
        "Can I pre-order the new {product} before it launches?",
        "I'd like a demo of your business package for my company of {n} people.",
        "Do you offer monthly instalments if I buy the {product} with professional installation?",
        "Is there a trade-in offer if I buy a new {product}?",
    ],
    "cancellation": [
        "Please cancel my {plan}, I no longer need it.",
        "I want to end my subscription at the end of this month.",
        "How do I stop the automatic renewal? I don't want to continue next year.",
        "I'm moving abroad and need to terminate my contract.",
        "Please close my membership, I've found a cheaper provider.",
        "I'd like to cancel the service before the free trial ends.",
        "How much notice do I need to give to end my contract?",
        "Please don't renew my {plan} when it expires on the {date}.",
        "I tried to cancel online but the button doesn't work, please cancel it for me.",
        "I'm not using the service anymore, can you shut it off permanently?",
        "Can I cancel mid-contract, and what would the early termination fee be?",
        "Please confirm that my {plan} has been cancelled, I sent a request last week.",
        "We're closing our business, so please end all our service agreements.",
        "I want to quit the {plan}, it's just not worth it for me.",
        "Stop my subscription box, I don't want any more of them.",
        "I need to cancel my late father's subscription.",
        "Please cancel my plan outright, pausing it isn't an option for me.",
        "I'm done with the service, please end it from today.",
        "Please terminate my internet service from the {date}.",
        "I signed up by accident yesterday, please cancel it right away.",
        "I don't want the {plan} to continue after my free month.",
        "Take me off the paid plan for good, I'll stick to the free version.",
        "How do I end my membership? I can't find the option anywhere in the settings.",
        "Please cancel both of the lines on my account, we are switching providers.",
    ],
    "feedback": [
        "Just wanted to say the technician who came out on {day} was fantastic.",
        "It would be great if the app had a dark mode.",
        "Your new website layout is confusing, the old one was much easier to use.",
        "The {product} has been working perfectly, really happy with it.",
        "A suggestion: it would be nice to choose evening time slots for visits.",
        "I had a great experience with your chat agent {name}, she solved everything quickly.",
        "Your hold music is terrible, you should really change it.",
        "I love the new feature that shows energy usage, keep it up.",
        "The instructions in the box could be a lot clearer, especially the diagrams.",
        "Not a complaint, just an idea: a widget for the home screen would be handy.",
        "Thanks for the quick response last week, it made a real difference.",
        "I think the packaging uses too much plastic, you could do better.",
        "Your survey was too long, so here is my opinion instead: the service is good.",
        "Please pass on my thanks to the delivery driver, he was very polite.",
        "Your prices are fair and the quality is great, I've recommended you to friends.",
        "The app would be easier to use if settings were grouped by room.",
        "I was disappointed by how long I waited on the phone, but the agent was kind.",
        "Adding more languages to the app would help, my parents only speak Portuguese.",
        "Five stars for the setup experience, it took me under ten minutes.",
        "Your monthly newsletter has been really useful, I read it every time.",
        "Honestly the best customer service I've had from any company this year.",
        "Small idea: let users rename devices straight from the main screen.",
        "The staff at your {city} store were really helpful when I visited.",
        "Keep up the good work, the last update made everything faster.",
    ],
}

TICKET_DETAILS = {
    "billing": [
        "I've attached a screenshot of the statement.",
        "My account number is {acct}.",
        "The charge went through on {day}.",
        "I've checked my bank app twice.",
        "This has happened two months in a row.",
        "The invoice number is INV-{num}.",
    ],
    "technical_support": [
        "I've already tried turning it off and on again.",
        "The model number is {model}.",
        "It started after the update on {day}.",
        "I've tried a different cable too.",
        "My whole family works from home so this is urgent.",
        "I've reinstalled everything and it made no difference.",
    ],
    "shipping": [
        "The tracking number is {tracking}.",
        "I'm not home during the day.",
        "It's a birthday present so I need it soon.",
        "I live in an apartment block with a concierge.",
        "The estimated date was {day}.",
        "I placed it {n} days ago.",
    ],
    "returns": [
        "I still have the original receipt.",
        "The box is unopened.",
        "I bought it on {day} from your website.",
        "It's still in perfect condition.",
        "The order number is {order}.",
        "I'd prefer the money back the same way I paid.",
    ],
    "account_access": [
        "I've tried two different browsers.",
        "My username is {user}.",
        "I use the same email as always, {email}.",
        "I need to get in today to download my documents.",
        "I've already cleared the cache and cookies.",
        "I've been a member for years and never had this problem.",
    ],
    "sales": [
        "Our budget is around {amount}.",
        "We're a team of {n} people.",
        "I'm ready to order this week if the price is right.",
        "I saw an ad for it on social media.",
        "Please send me a brochure.",
        "We'd like to decide before the end of the quarter.",
    ],
    "cancellation": [
        "My account number is {acct}.",
        "Please send me a confirmation email.",
        "I don't want to be contacted with offers to stay.",
        "It's nothing personal.",
        "I've been with you for {years} years.",
        "Please make sure nothing else is taken from my account.",
    ],
    "feedback": [
        "No need to reply.",
        "Just thought you should know.",
        "I hope this helps.",
        "I've been a customer for {years} years.",
        "Feel free to share this with the team.",
        "I don't need anything else, just wanted to share.",
    ],
}

# (text, is_request): openers/closers that ask for help are not used on feedback tickets.
TICKET_OPENERS = [
    ("Hi,", False),
    ("Hello,", False),
    ("Hey there,", False),
    ("Good morning,", False),
    ("Good afternoon,", False),
    ("Dear support,", False),
    ("Hi team,", False),
    ("To whom it may concern,", False),
    ("Hello support team.", False),
    ("Hi there.", False),
    ("Hey,", False),
    ("Morning,", False),
    ("Hiya,", False),
    ("Greetings.", False),
    ("Hi, hope you're well.", False),
    ("Hello, hoping you can help.", True),
    ("Quick question.", True),
    ("I need some help please.", True),
    ("Sorry to bother you.", False),
    ("Hi, it's {name} here.", False),
]
TICKET_CLOSERS = [
    ("Thanks.", False),
    ("Thank you!", False),
    ("Thanks in advance.", True),
    ("Please help.", True),
    ("Cheers.", False),
    ("Regards, {name}", False),
    ("Any help appreciated.", True),
    ("Looking forward to your reply.", True),
    ("Thanks, {name}", False),
    ("Please get back to me soon.", True),
    ("Best, {name}", False),
    ("Many thanks.", False),
    ("Appreciate it.", False),
    ("Kind regards.", False),
    ("What should I do?", True),
    ("Have a nice day.", False),
]

_NAMES = "Alex Maria John Priya Tom Chen Fatima Lucas Emma Sven Aisha Diego Olga Kenji Grace Sam Nora Omar Lena Raj".split()
_PRODUCTS = [
    "router",
    "mesh Wi-Fi system",
    "smart plug",
    "security camera",
    "wireless printer",
    "streaming box",
    "smart thermostat",
    "video doorbell",
    "smart speaker",
    "modem",
]
_PLANS = [
    "Premium plan",
    "Family plan",
    "Basic plan",
    "Pro membership",
    "streaming add-on",
    "cloud storage plan",
    "Fiber 500 package",
]
_APPS = ["the app", "the mobile app", "the iOS app", "the Android app", "the desktop app"]
_COLORS = ["black", "white", "blue", "silver", "green", "red"]


def _ticket_values(rng: Random) -> dict:
    def amount() -> str:
        cur = rng.choice(["$", "$", "£", "€"])
        return f"{cur}{rng.randint(5, 199)}.{rng.choice(['00', '99', '50', '49', '95'])}"

    name = rng.choice(_NAMES)
    p1, p2 = rng.sample(_PRODUCTS, 2)
    pl1, pl2 = rng.sample(_PLANS, 2)
    c1, c2 = rng.sample(_COLORS, 2)
    s2 = rng.choice([100, 200, 300, 500, 900])
    d = rng.randint(1, 28)
    suffix = "th" if 11 <= d <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(d % 10, "th")
    a1 = amount()
    a2 = amount()
    while a2 == a1:
        a2 = amount()
    return {
        "name": name,
        "product": p1,
        "product2": p2,
        "plan": pl1,
        "plan2": pl2,
        "color": c1,
        "color2": c2,
        "amount": a1,
        "amount2": a2,
        "app": rng.choice(_APPS),
        "order": f"#{rng.randint(1000000, 9999999)}",
        "n": rng.choice([3, 4, 5, 6, 8, 10, 12, 14, 20]),
        "years": rng.choice([2, 3, 4, 5, 7, 10]),
        "day": rng.choice(WEEKDAYS).capitalize(),
        "date": f"{d}{suffix}",
        "country": rng.choice(["Canada", "Ireland", "Norway", "Mexico", "Australia", "Japan"]),
        "error": rng.choice(["E-203", "0x80070005", "ERR_TIMEOUT", "651", "E17", "NET-404"]),
        "pct": rng.choice([12, 37, 58, 64, 80, 99]),
        "speed": rng.randint(3, s2 // 4),
        "speed2": s2,
        "company": rng.choice(["Northwind Ltd", "Acme Tools", "Blue Harbor Cafe", "Kim & Sons"]),
        "city": rng.choice(["Leeds", "Denver", "Lyon", "Toronto", "Perth", "Austin"]),
        "acct": f"{rng.randint(10, 99)}-{rng.randint(100000, 999999)}",
        "num": rng.randint(10000, 99999),
        "model": rng.choice(["AX-3000", "HX200", "R7-Pro", "MX-52", "ZB-11"]),
        "tracking": "1Z"
        + "".join(rng.choice("ABCDEFGHJKLMNPRSTUVWXYZ0123456789") for _ in range(10)),
        "user": f"{name.lower()}{rng.randint(1, 99)}",
        "email": f"{name.lower()}.{rng.randint(1, 999)}@{rng.choice(['gmail.com', 'outlook.com', 'mail.com'])}",
    }


def gen_tickets(seed: int, n_train: int, n_test: int) -> dict:
    labels = sorted(TICKET_CORES)
    pools = {}
    for lab in labels:
        pools[("core", lab)] = split_pool(f"tickets/core/{lab}", TICKET_CORES[lab], seed)
        pools[("detail", lab)] = split_pool(f"tickets/detail/{lab}", TICKET_DETAILS[lab], seed)
    pools["opener"] = split_pool("tickets/opener", TICKET_OPENERS, seed)
    pools["closer"] = split_pool("tickets/closer", TICKET_CLOSERS, seed)

    def make(split: str, rng: Random, label: str):
        # feedback tickets ask for nothing, so they get no "please help" openers or closers
        def allowed(pool):
            return [t for t, asks in pools[pool][split] if not (asks and label == "feedback")]

        core = rng.choice(pools[("core", label)][split])
        details = pools[("detail", label)][split]
        parts = [rng.choice(allowed("opener")) if rng.random() < 0.55 else ""]
        body = [core]
        if rng.random() < 0.45:
            body.append(rng.choice(details))
        elif rng.random() < 0.2:
            body.insert(0, rng.choice(details))
        parts += body
        parts.append(rng.choice(allowed("closer")) if rng.random() < 0.5 else "")
        template = join_parts(parts)
        template = text_noise(template, rng, typo_p=0.2, abbrev_p=0.08)
        text = sentence_case(fill(template, _ticket_values(rng)))
        text = case_noise(text, rng, lower_p=0.12, upper_p=0.02, nopunct_p=0.15)
        return text, [p for p in parts if p]

    def rows(split, text, label):
        return {
            "messages": [
                {"role": "system", "content": TICKETS_SYSTEM},
                {"role": "user", "content": text},
                {"role": "assistant", "content": label},
            ]
        }

    return _generate("tickets", seed, labels, make, rows, n_train, n_test, lambda lab: lab)


# --------------------------------------------------------------------------------------------
# Task 2: intent_slots -> "intent=...; field=value; ..."
# --------------------------------------------------------------------------------------------

INTENT_SYSTEM = (
    "Extract the intent and its fields from the user's request. Answer in the form "
    "intent=<name>; <field>=<value>; ... and nothing else."
)

# field order per intent (the answer lists fields in exactly this order)
INTENT_FIELDS = {
    "set_alarm": ["time", "day"],
    "set_timer": ["minutes"],
    "set_temperature": ["room", "degrees"],
    "set_lights": ["room", "state"],
    "play_music": ["genre", "room"],
    "add_to_list": ["item", "list"],
    "get_weather": ["city", "day"],
}

# Core templates. set_lights templates carry their state; add_to_list templates may be limited
# to some lists (noun-only phrasing like "we need {item}" does not fit to-do items).
INTENT_CORES = {
    "set_alarm": [
        "Set an alarm for {time} {day}.",
        "Wake me up at {time} {day}.",
        "{day}, I need to be up at {time}, set an alarm.",
        "Can you set an alarm {day} at {time}?",
        "Alarm for {time} {day} please.",
        "I want an alarm at {time} {day}.",
        "Make sure I'm awake by {time} {day}.",
        "Put an alarm on for {time} {day}.",
        "Schedule a wake-up alarm at {time} {day}.",
        "Could you get me up at {time} {day}?",
        "I need waking at {time} {day}.",
        "Set my alarm to go off {day} at {time}.",
        "Add an alarm: {time}, {day}.",
        "Buzz me awake at {time} {day}, I can't be late.",
        "{day} I have to get up at {time}, please set the alarm.",
        "Have the alarm ring at {time} {day}.",
    ],
    "set_timer": [
        "Set a timer for {dur}.",
        "Start a {dur_adj} timer.",
        "Countdown of {dur} please.",
        "Can you time {dur} for me?",
        "Tell me when {dur} is up.",
        "Timer, {dur}.",
        "Give me a {dur_adj} timer.",
        "I need a timer for {dur}.",
        "Set the kitchen timer to {dur}.",
        "Ping me in {dur}, I'm timing something.",
        "Start counting down {dur}.",
        "Put {dur} on the clock.",
        "Could you run a {dur_adj} countdown?",
        "Time me for {dur}.",
        "Let me know once {dur} has passed.",
    ],
    "set_temperature": [
        "Set the {room} to {deg}.",
        "Make it {deg} in the {room}.",
        "Can you turn the heating in the {room} up to {deg}?",
        "I'd like the {room} at {deg}.",
        "Cool the {room} down to {deg}.",
        "Change the thermostat in the {room} to {deg}.",
        "Heat the {room} to {deg}.",
        "The {room} is too cold, bring it up to {deg}.",
        "Drop the {room} temperature to {deg}.",
        "It's only {cur} in the {room}, can you raise it to {deg}?",
        "Warm up the {room} to {deg}, please.",
        "Please keep the {room} at {deg} tonight.",
        "Adjust the {room} thermostat so it's {deg}.",
        "It's {cur} in the {room} and way too warm, take it down to {deg}.",
        "Get the {room} to {deg}.",
        "{room} thermostat to {deg}.",
    ],
    "set_lights": [
        ("Turn on the lights in the {room}.", "on"),
        ("Switch the {room} lights on.", "on"),
        ("Lights on in the {room}.", "on"),
        ("Can you light up the {room}?", "on"),
        ("It's pitch black in the {room}, put the lights on.", "on"),
        ("I need some light in the {room}.", "on"),
        ("Put the {room} lights on.", "on"),
        ("Could you flip the {room} lights on?", "on"),
        ("{room} lights, on please.", "on"),
        ("Bring the lights up in the {room}.", "on"),
        ("Turn off the {room} lights.", "off"),
        ("Kill the lights in the {room}.", "off"),
        ("Switch off the lights in the {room}.", "off"),
        ("Lights out in the {room}.", "off"),
        ("Shut the {room} lights off.", "off"),
        ("Nobody's in the {room}, turn the lights off.", "off"),
        ("Can you cut the lights in the {room}?", "off"),
        ("Make the {room} dark, lights off.", "off"),
        ("{room} lights, off please.", "off"),
        ("Power down the lights in the {room}.", "off"),
    ],
    "play_music": [
        "Play some {genre} in the {room}.",
        "Put on {genre} music in the {room}.",
        "I want to hear {genre} in the {room}.",
        "Start a {genre} playlist in the {room}.",
        "Can we get some {genre} going in the {room}?",
        "Throw on some {genre} in the {room}.",
        "Play {genre} on the {room} speaker.",
        "Over in the {room}, play some {genre}.",
        "Let's have {genre} in the {room}.",
        "Queue up {genre} tracks for the {room}.",
        "I'm in the mood for {genre}, play it in the {room}.",
        "Music in the {room}: {genre}, please.",
        "Could the {room} speaker play {genre}?",
        "Stream some {genre} to the {room}.",
        "Fill the {room} with {genre}.",
        "I'd love some {genre} in the {room} right now.",
    ],
    "add_to_list": [
        ("Add {item} to my {list}.", None),
        ("Put {item} on the {list}.", None),
        ("Can you add {item} to the {list}?", None),
        ("{item} needs to go on my {list}.", None),
        ("Don't let me forget {item}, stick it on the {list}.", None),
        ("Please add {item} to our {list}.", None),
        ("Write {item} down on the {list}.", None),
        ("Include {item} in the {list}.", None),
        ("Jot down {item} on my {list}.", None),
        ("Note {item} on the {list}.", None),
        ("Could you pop {item} onto the {list}?", None),
        ("We need {item}, add it to the {list}.", ("shopping", "packing")),
        ("We're out of {item}, put it on the {list}.", ("shopping",)),
        ("Remind me to {item} by adding it to my {list}.", ("todo",)),
        ("I have to {item}, put that on the {list}.", ("todo",)),
        ("Make sure {item} is on the {list}.", None),
    ],
    "get_weather": [
        "What's the weather in {city} {day}?",
        "Will it rain in {city} {day}?",
        "Do I need an umbrella in {city} {day}?",
        "How hot will it be in {city} {day}?",
        "What's the forecast for {city} {day}?",
        "Is it going to snow in {city} {day}?",
        "Tell me the weather for {city} {day}.",
        "How cold is it going to be in {city} {day}?",
        "{day}, what's the weather looking like in {city}?",
        "Should I bring a jacket to {city} {day}?",
        "Any sun expected in {city} {day}?",
        "Weather in {city} {day}, please.",
        "I'm flying to {city} {day}, what will the weather be like there?",
        "Is {city} going to be windy {day}?",
        "Check the forecast in {city} for me, {day}.",
        "What temperature will it be in {city} {day}?",
    ],
}

INTENT_CONTEXT = {
    "set_alarm": [
        "I have a flight to catch.",
        "I've got an early shift.",
        "Don't let me oversleep.",
        "I have a job interview.",
        "I keep sleeping through my alarms.",
        "I need to take the dog out.",
    ],
    "set_timer": [
        "The pasta is on.",
        "I'm doing a workout.",
        "The cake is in the oven.",
        "I'm steeping some tea.",
        "The kids get screen time until then.",
        "I'm letting the dough rest.",
    ],
    "set_temperature": [
        "It's freezing in here.",
        "The baby is napping.",
        "Guests are coming over.",
        "I'm working from home today.",
        "The heating feels off.",
        "I'm sweating.",
    ],
    "set_lights": [
        "I'm in the other room.",
        "My hands are full.",
        "Just got home.",
        "I can't find the switch.",
        "The kids are asleep upstairs.",
        "I'm on the sofa.",
    ],
    "play_music": [
        "We're having friends over.",
        "I need to focus.",
        "I'm cooking dinner.",
        "It's too quiet in here.",
        "I'm doing the cleaning.",
        "We're relaxing after work.",
    ],
    "add_to_list": [
        "Before I forget.",
        "I just noticed.",
        "I'm going into town later.",
        "My partner reminded me.",
        "Quick note.",
        "This is important.",
    ],
    "get_weather": [
        "I'm planning a picnic.",
        "I'm going there for work.",
        "Trying to decide what to pack.",
        "My parents live there.",
        "We have an outdoor event.",
        "I'm going hiking.",
    ],
}
INTENT_OPENERS = [
    "Hey,",
    "Hey Nova,",
    "Okay,",
    "Hi,",
    "Quick one,",
    "Hello,",
    "Um,",
    "Alright,",
    "Nova,",
    "Hey assistant,",
    "Excuse me,",
    "So,",
    "Hi there,",
    "Right,",
]
INTENT_POLITE = ["Thanks!", "Thank you.", "Cheers.", "Thanks a lot.", "Appreciate it.", "Ta."]

ROOMS = [
    "living room",
    "bedroom",
    "kitchen",
    "bathroom",
    "office",
    "hallway",
    "nursery",
    "basement",
    "dining room",
    "guest room",
    "garage",
    "attic",
]
ROOMS_TEST_ONLY = ["study", "laundry room"]
GENRES = [
    "jazz",
    "rock",
    "classical",
    "hip hop",
    "lo-fi",
    "country",
    "pop",
    "ambient",
    "blues",
    "reggae",
    "metal",
    "folk",
    "soul",
    "funk",
    "techno",
]
GENRES_TEST_ONLY = ["bossa nova", "k-pop"]
LIST_ITEMS = {
    "shopping": [
        "milk",
        "eggs",
        "oat milk",
        "bananas",
        "dish soap",
        "coffee beans",
        "paper towels",
        "olive oil",
        "bread",
        "rice",
        "batteries",
        "toothpaste",
        "butter",
        "greek yogurt",
        "laundry detergent",
        "tomatoes",
        "cat food",
        "orange juice",
        "cheddar cheese",
        "pasta",
        "honey",
    ],
    "todo": [
        "call the plumber",
        "renew the passport",
        "book the dentist",
        "pay the rent",
        "water the plants",
        "email the landlord",
        "fix the bike",
        "return the library books",
        "call grandma",
        "clean the gutters",
        "defrost the freezer",
        "send the birthday card",
    ],
    "packing": [
        "sunscreen",
        "phone charger",
        "swimsuit",
        "hiking boots",
        "rain jacket",
        "sunglasses",
        "adapter plug",
        "travel pillow",
        "first aid kit",
        "headphones",
    ],
}
LIST_ITEMS_TEST_ONLY = {
    "shopping": ["almond flour", "trash bags", "sparkling water", "frozen peas"],
    "todo": ["book a haircut", "change the smoke alarm battery"],
    "packing": ["bug spray", "flip flops"],
}
LIST_NAMES = {
    "shopping": ["shopping list"],
    "todo": ["to-do list", "todo list", "to do list"],
    "packing": ["packing list"],
}
CITIES = [
    "Oslo",
    "Lisbon",
    "Berlin",
    "Madrid",
    "Tokyo",
    "Chicago",
    "Toronto",
    "Dublin",
    "Vienna",
    "Prague",
    "Seattle",
    "Sydney",
    "Nairobi",
    "Mumbai",
    "Boston",
    "Denver",
    "Rome",
    "Paris",
    "Athens",
    "Helsinki",
    "New York",
    "San Francisco",
    "Cape Town",
    "Buenos Aires",
]
CITIES_TEST_ONLY = ["Reykjavik", "Kuala Lumpur", "Montreal", "Krakow", "Lima", "Porto"]
TIMER_MINUTES = [
    1,
    2,
    3,
    4,
    5,
    6,
    7,
    8,
    10,
    12,
    15,
    18,
    20,
    25,
    30,
    35,
    40,
    45,
    50,
    60,
    75,
    90,
    120,
]


def _hour12(h: int) -> int:
    return h % 12 or 12


def _part_of_day(h: int) -> str:
    if h < 12:
        return "in the morning"
    if h < 17:
        return "in the afternoon"
    if h < 22:
        return "in the evening"
    return "at night"


def time_phrases(h: int, m: int) -> list[str]:
    """Unambiguous spoken/written forms of the 24-hour time h:m (answer: HH:MM)."""
    if (h, m) == (12, 0):
        return ["noon", "midday", "12 pm", "12:00 pm", "twelve noon"]
    h12 = _hour12(h)
    ap = "am" if h < 12 else "pm"
    out = [
        f"{h12}:{m:02d} {ap}",
        f"{h12}:{m:02d}{ap}",
        f"{h12}:{m:02d} {ap.upper()}",
        f"{h12}.{m:02d} {'a.m.' if ap == 'am' else 'p.m.'}",
        f"{h:02d}:{m:02d}",
    ]
    part = _part_of_day(h)
    if m == 0:
        out += [f"{h12} {ap}", f"{num_words(h12)} o'clock {part}", f"{num_words(h12)} {part}"]
    elif m == 30:
        out += [f"half past {num_words(h12)} {part}", f"{num_words(h12)} thirty {ap}"]
    elif m == 15:
        out += [f"quarter past {num_words(h12)} {part}", f"{num_words(h12)} fifteen {ap}"]
    elif m == 45:
        out += [f"quarter to {num_words(_hour12(h + 1))} {part}"]
    elif m < 10:
        out += [f"{num_words(h12)} oh {num_words(m)} {ap}"]
    else:
        out += [f"{num_words(h12)} {num_words(m)} {ap}"]
    return out


def duration_phrases(m: int) -> tuple[list[str], list[str]]:
    """(noun phrases, adjective phrases) for a duration of m minutes."""
    nouns, adjs = [], []
    if m == 1:
        nouns += ["1 minute", "one minute", "a minute"]
        adjs += ["one-minute", "1-minute"]
    elif m < 60:
        nouns += [f"{m} minutes", f"{m} mins", f"{num_words(m)} minutes"]
        adjs += [f"{m}-minute", f"{num_words(m)}-minute", f"{m} min"]
    if m == 15:
        nouns += ["a quarter of an hour", "quarter of an hour"]
    if m == 30:
        nouns += ["half an hour", "a half hour"]
        adjs += ["half-hour", "half hour"]
    if m == 45:
        nouns += ["three quarters of an hour"]
    if m == 60:
        nouns += ["an hour", "one hour", "1 hour", "60 minutes"]
        adjs += ["one-hour", "1-hour", "60-minute"]
    if m == 75:
        nouns += ["an hour and fifteen minutes", "1 hour 15 minutes", "75 minutes"]
        adjs += ["75-minute"]
    if m == 90:
        nouns += ["an hour and a half", "one and a half hours", "1.5 hours", "90 minutes"]
        adjs += ["90-minute", "hour-and-a-half"]
    if m == 120:
        nouns += ["two hours", "2 hours", "120 minutes"]
        adjs += ["two-hour", "2-hour"]
    return nouns, adjs


def degree_phrases(d: int) -> list[str]:
    return [
        f"{d} degrees",
        f"{d}°",
        f"{d}°C",
        f"{d} degrees Celsius",
        f"{num_words(d)} degrees",
        f"{d}C",
    ]


def day_phrases(day: str, weather: bool) -> list[str]:
    if day == "today":
        return ["today", "later today"] + (["tonight", "this evening"] if weather else [])
    if day == "tomorrow":
        return ["tomorrow", "tomorrow"] + (["tomorrow morning"] if weather else [])
    cap = day.capitalize()
    return [f"on {cap}", f"this {cap}", f"{cap}"]


def _pick_day(rng: Random) -> str:
    r = rng.random()
    return "today" if r < 0.2 else "tomorrow" if r < 0.45 else rng.choice(WEEKDAYS)


def _intent_example(rng: Random, split: str, intent: str, core) -> tuple[dict, dict]:
    """Choose canonical field values and their surface forms for one core template.

    Returns (fields in answer order, placeholder -> surface text)."""
    test = split == "test"
    rooms = ROOMS + (ROOMS_TEST_ONLY if test else [])
    if intent == "set_alarm":
        h = rng.choice([5, 6, 6, 7, 7, 8, 9, 10, 11, 12, 13, 14, 16, 18, 20, 21, 22, 23])
        m = 0 if h == 12 else rng.choice([0, 0, 5, 10, 15, 20, 30, 30, 40, 45, 50])
        day = _pick_day(rng)
        fields = {"time": f"{h:02d}:{m:02d}", "day": day}
        surf = {"time": rng.choice(time_phrases(h, m)), "day": rng.choice(day_phrases(day, False))}
    elif intent == "set_timer":
        m = rng.choice(TIMER_MINUTES)
        nouns, adjs = duration_phrases(m)
        if "{dur_adj}" in core and not adjs:
            return None, None
        fields = {"minutes": str(m)}
        surf = {"dur": rng.choice(nouns), "dur_adj": rng.choice(adjs) if adjs else ""}
    elif intent == "set_temperature":
        room = rng.choice(rooms)
        d = rng.randint(16, 26)
        # the "current temperature" distractor agrees with the template's direction
        lower = "raise" in core
        cur = rng.choice([x for x in range(13, 30) if (x <= d - 2 if lower else x >= d + 2)])
        fields = {"room": room, "degrees": str(d)}
        surf = {"room": room, "deg": rng.choice(degree_phrases(d)), "cur": f"{cur} degrees"}
    elif intent == "set_lights":
        core, state = core
        room = rng.choice(rooms)
        fields = {"room": room, "state": state}
        surf = {"room": room}
    elif intent == "play_music":
        room = rng.choice(rooms)
        genre = rng.choice(GENRES + (GENRES_TEST_ONLY if test else []))
        fields = {"genre": genre, "room": room}
        surf = {"genre": genre, "room": room}
    elif intent == "add_to_list":
        core, allowed = core
        lst = rng.choice(allowed or sorted(LIST_ITEMS))
        item = rng.choice(LIST_ITEMS[lst] + (LIST_ITEMS_TEST_ONLY[lst] if test else []))
        fields = {"item": item, "list": lst}
        surf = {"item": item, "list": rng.choice(LIST_NAMES[lst])}
    elif intent == "get_weather":
        city = rng.choice(CITIES + (CITIES_TEST_ONLY if test else []))
        day = _pick_day(rng)
        fields = {"city": city, "day": day}
        surf = {"city": city, "day": rng.choice(day_phrases(day, True))}
    else:
        raise KeyError(intent)
    assert list(fields) == INTENT_FIELDS[intent]
    return fields, {"core": core, **surf}


def format_intent(intent: str, fields: dict) -> str:
    return "; ".join([f"intent={intent}"] + [f"{k}={fields[k]}" for k in INTENT_FIELDS[intent]])


def parse_intent_answer(answer: str) -> dict:
    """Inverse of format_intent: 'intent=x; a=1' -> {'intent': 'x', 'a': '1'} (for field accuracy)."""
    out = {}
    for part in answer.split(";"):
        key, _, value = part.strip().partition("=")
        if key:
            out[key.strip()] = value.strip()
    return out


def gen_intent_slots(seed: int, n_train: int, n_test: int) -> dict:
    labels = sorted(INTENT_CORES)
    pools = {}
    for lab in labels:
        pools[("core", lab)] = split_pool(f"intent/core/{lab}", INTENT_CORES[lab], seed)
        pools[("context", lab)] = split_pool(f"intent/context/{lab}", INTENT_CONTEXT[lab], seed)
    # set_lights: split on/off templates separately so both states are in both splits
    on = [c for c in INTENT_CORES["set_lights"] if c[1] == "on"]
    off = [c for c in INTENT_CORES["set_lights"] if c[1] == "off"]
    s_on, s_off = (
        split_pool("intent/core/lights_on", on, seed),
        split_pool("intent/core/lights_off", off, seed),
    )
    pools[("core", "set_lights")] = {k: s_on[k] + s_off[k] for k in ("train", "test")}
    pools["opener"] = split_pool("intent/opener", INTENT_OPENERS, seed)
    pools["polite"] = split_pool("intent/polite", INTENT_POLITE, seed)
    answers = {}
    lights_made = Counter()

    def make(split: str, rng: Random, intent: str):
        cores = pools[("core", intent)][split]
        if intent == "set_lights":  # pick the state first so on/off stay balanced in both splits
            state = ["on", "off"][lights_made[split] % 2]
            lights_made[split] += 1
            cores = [c for c in cores if c[1] == state]
        core = rng.choice(cores)
        fields, surf = _intent_example(rng, split, intent, core)
        if fields is None:
            return None, None
        body = [surf.pop("core")]
        if rng.random() < 0.65:
            ctx = rng.choice(pools[("context", intent)][split])
            body.insert(0 if rng.random() < 0.5 else 1, ctx)
        if rng.random() < 0.4:
            body.insert(0, rng.choice(pools["opener"][split]))
        if rng.random() < 0.3:
            body.append(rng.choice(pools["polite"][split]))
        template = text_noise(join_parts(body), rng, typo_p=0.15, abbrev_p=0.06)
        text = sentence_case(fill(template, surf))
        text = case_noise(text, rng, lower_p=0.15, upper_p=0.0, nopunct_p=0.2)
        ans = format_intent(intent, fields)
        if answers.setdefault(text, ans) != ans:
            raise AssertionError(f"ambiguous text {text!r}: {answers[text]} vs {ans}")
        return text, body

    def rows(split, text, intent):
        return {
            "messages": [
                {"role": "system", "content": INTENT_SYSTEM},
                {"role": "user", "content": text},
                {"role": "assistant", "content": answers[text]},
            ]
        }

    return _generate(
        "intent_slots", seed, labels, make, rows, n_train, n_test, lambda lab: lab, min_words=8
    )


# --------------------------------------------------------------------------------------------
# Task 3: sentiment_aspect -> "<sentiment>, <aspect>"
# --------------------------------------------------------------------------------------------

SENTIMENTS = ["positive", "negative", "neutral"]
ASPECTS = ["battery", "screen", "price", "delivery", "support"]

REVIEW_CORES = {
    ("battery", "positive"): [
        "The battery easily lasts two full days, even with heavy use.",
        "I only need to charge it twice a week, which is amazing.",
        "It runs all day and still has plenty of juice left at bedtime.",
        "Charging is quick and a full charge lasts forever.",
        "I took it on a weekend trip without the charger and never ran out of power.",
        "Runtime is excellent, way better than my previous {product}.",
        "Battery life is the best thing about it, I barely think about charging anymore.",
        "Even after a long day of streaming it's still at around half charge.",
        "It goes for days between charges, very impressive endurance.",
        "It goes from empty to full in under an hour and then keeps going all day.",
    ],
    ("battery", "negative"): [
        "The battery is dead by lunchtime every single day.",
        "I have to plug it in three times a day, the charge just drains away.",
        "It loses about ten percent an hour even when I'm not using it.",
        "The battery won't hold a charge anymore after just a month.",
        "Runtime is awful, it barely makes it through a movie.",
        "It shuts off at 30 percent because the battery can't cope.",
        "Charging takes forever and the power is gone again in a few hours.",
        "I can't leave the house without a power bank because it dies so fast.",
        "The battery swelled up after a few weeks and now it barely lasts an hour.",
        "Standby drain is terrible, I find it empty every morning.",
    ],
    ("battery", "neutral"): [
        "The battery lasts about a day, which is roughly what I expected.",
        "Battery life is average, nothing special either way.",
        "It needs charging every night, like most devices of this kind.",
        "Runtime matches what the box says, no more and no less.",
        "The charge gets me through a normal workday, though not much longer.",
        "The battery is okay; it's not a strength but not a problem either.",
        "I charge it overnight and it does a day, pretty standard.",
        "Battery performance is about the same as my last {product}.",
        "It takes a couple of hours to charge, which is normal.",
        "Power-wise it's unremarkable, a day of use per charge.",
    ],
    ("screen", "positive"): [
        "The display is gorgeous, colors really pop.",
        "Text looks razor sharp and it's easy to read even in direct sunlight.",
        "The screen is bright, crisp and a joy to look at.",
        "Watching videos on this display is a treat, the blacks are so deep.",
        "I love how vivid and smooth the screen is when scrolling.",
        "Viewing angles are excellent, the picture looks great from anywhere.",
        "The screen is the highlight, photos look stunning on it.",
        "Super clear display, I can read small print without my glasses.",
        "Touch response is instant and the panel looks fantastic.",
        "The colors on the screen are rich and perfectly accurate.",
    ],
    ("screen", "negative"): [
        "The display is so dim that I can't see anything outdoors.",
        "There's a dead pixel right in the middle of the screen.",
        "Colors look washed out and everything on the display seems grainy.",
        "The screen scratched within a week and now it flickers.",
        "Text is blurry on this display, it gives me a headache.",
        "The touchscreen keeps missing my taps and sometimes registers ghost touches.",
        "There's an ugly yellow tint on one side of the panel.",
        "Glare makes the screen basically unusable near a window.",
        "The display cracked on its own after a few days.",
        "The screen has terrible backlight bleed in every corner.",
    ],
    ("screen", "neutral"): [
        "The display is okay, not the sharpest but fine for reading.",
        "Screen quality is average for this kind of {product}.",
        "The colors are accurate enough, nothing that stands out.",
        "Brightness is adequate indoors; I haven't tried the screen much outside.",
        "The screen is decent, about what you'd expect at this level.",
        "Display resolution is standard, it does the job.",
        "The panel is neither impressive nor bad, just ordinary.",
        "The screen size is fine and the picture is acceptable.",
        "Text on the display renders alright, similar to other devices I've used.",
        "The touchscreen works as expected, nothing more to say about it.",
    ],
    ("price", "positive"): [
        "For what I paid, this is an absolute bargain.",
        "It costs half as much as the big brands and feels just as good.",
        "Great value for money, I'd happily have paid more.",
        "I got it on sale and it was a steal.",
        "It was the cheapest option I found and it doesn't feel cheap at all.",
        "Very reasonably priced compared to everything else on the market.",
        "Worth every penny I spent on it.",
        "Amazing deal, you won't find better for this money.",
        "The cost was low and I feel like I got far more than I paid for.",
        "Incredible value, it's a fraction of what competitors charge.",
    ],
    ("price", "negative"): [
        "Way overpriced for what you actually get.",
        "It costs twice as much as similar models and isn't any better.",
        "Not worth the money at all, I feel ripped off.",
        "At this price I expected much more, it's a rip-off.",
        "Far too expensive for such a basic {product}.",
        "I paid a premium and got a budget experience.",
        "You can get the same thing elsewhere for a fraction of the cost.",
        "Hard to justify spending this much on it.",
        "The extra accessories cost a fortune on top of an already high price.",
        "The price tag is ridiculous for this level of quality.",
    ],
    ("price", "neutral"): [
        "The price is about what similar products cost.",
        "It's neither cheap nor expensive, fairly priced for the category.",
        "Cost was in the middle of the range I was looking at.",
        "Price-wise it's standard, I didn't find a better or worse deal.",
        "You get what you pay for, no more and no less.",
        "It's priced the same as the competition.",
        "The cost is reasonable but not a bargain either.",
        "I paid the normal retail price, nothing special.",
        "Value for the money is okay, roughly average.",
        "The price is in line with other {product}s I looked at.",
    ],
    ("delivery", "positive"): [
        "It arrived a day earlier than promised and was packed really well.",
        "Shipping was lightning fast, ordered Monday and had it Tuesday.",
        "The courier was friendly and the box arrived in perfect condition.",
        "Delivery was quick and tracking was accurate the whole way.",
        "It came the next day even though I picked the free shipping option.",
        "The parcel showed up on time and everything was well protected.",
        "Super speedy delivery, it was on my doorstep within 24 hours.",
        "It turned up ahead of schedule, which was a nice surprise.",
        "The package was handled carefully and arrived exactly when they said.",
        "Fast dispatch and a smooth delivery right to my door.",
    ],
    ("delivery", "negative"): [
        "It took three weeks to arrive and nobody could tell me where it was.",
        "The box showed up crushed and soaking wet.",
        "The courier left it in the street and it nearly got stolen.",
        "Shipping was delayed four times with no explanation.",
        "Tracking said delivered but it turned up five days later at a neighbour's.",
        "It arrived late and the packaging was torn open.",
        "I waited at home all day and the parcel never came.",
        "The delivery was a mess, it went to the wrong town first.",
        "It took ages to ship and the parcel looked like it had been kicked around.",
        "The driver threw the package over my fence.",
    ],
    ("delivery", "neutral"): [
        "It arrived on the date given, in standard packaging.",
        "Shipping took the usual four or five days.",
        "The delivery was fine, nothing fast or slow about it.",
        "The package came when expected, nothing to comment on.",
        "Normal delivery time, plain box, no issues.",
        "It came within the estimated delivery window.",
        "Delivery took about a week, like most places.",
        "The courier dropped it off as scheduled, pretty routine.",
        "Shipping was standard, no surprises either way.",
        "The parcel arrived in the regular time frame.",
    ],
    ("support", "positive"): [
        "Customer service replied within an hour and sorted my question right away.",
        "The help desk walked me through the setup patiently.",
        "I had an issue with pairing and the agent fixed it in minutes.",
        "Their support team was friendly, knowledgeable and quick.",
        "When I called, a real person answered and actually solved my problem.",
        "The staff went above and beyond to help me with a setting I couldn't find.",
        "Brilliant after-sales care, they followed up to make sure everything worked.",
        "The live chat was fast and the person knew exactly what to do.",
        "The warranty team replaced a faulty cable for free without any hassle.",
        "Whenever I've contacted them, the service team has been helpful and kind.",
    ],
    ("support", "negative"): [
        "Customer service never answered my emails.",
        "I spent two hours on hold and then got disconnected.",
        "The agent was rude and didn't even try to help.",
        "Support kept sending me the same useless copy-paste reply.",
        "Nobody at the help desk could explain how to fix my problem.",
        "They promised a callback three times and never called.",
        "The chat bot just goes in circles and there's no way to reach a human.",
        "I was passed between five departments and still have no answer.",
        "Their warranty team refused to help and blamed me for the fault.",
        "Contacting the company about a question was a complete waste of time.",
    ],
    ("support", "neutral"): [
        "I contacted support once and they answered in a couple of days.",
        "Customer service was polite but took a while to get back to me.",
        "The help desk answered my question, nothing more, nothing less.",
        "Support was standard, a typical scripted conversation.",
        "I got a reply from their team within the usual timeframe.",
        "The agent sent me a link to the manual, which was enough.",
        "Service was adequate when I called, no complaints and no praise.",
        "Their support is like any other company's, it's okay.",
        "I emailed a question and got a generic but correct answer.",
        "The support line worked the way these things usually do.",
    ],
}
REVIEW_OPENERS = [
    "Bought this {product} for my commute.",
    "Got the {product} as a birthday present for my son.",
    "I've had this {product} for {period} now.",
    "Ordered the {product} to replace my old one.",
    "This is my second {product} from this brand.",
    "I use the {product} mostly for work.",
    "Picked up this {product} after reading a lot of reviews.",
    "My wife and I both use this {product}.",
    "Upgraded to this {product} {period} ago.",
    "I needed a {product} for travelling.",
    "Here is my honest review of the {product}.",
    "Update after {period} of use:",
    "Quick review.",
    "Writing this after {period} with the {product}.",
    "I was looking for a {product} for my dad.",
    "Decided to try this {product} after my old one broke.",
    "Bought it for my daughter's school work.",
    "This replaced a {product} I'd had for years.",
]
REVIEW_CLOSERS = {
    "positive": [
        "Would recommend.",
        "Very happy overall.",
        "Five stars from me.",
        "Would buy again.",
        "Really impressed.",
        "No regrets.",
        "Definitely recommending it to friends.",
        "Great stuff.",
        "Love it.",
    ],
    "negative": [
        "Very disappointed.",
        "Would not recommend.",
        "One star.",
        "Not buying from here again.",
        "Avoid.",
        "Really frustrating.",
        "I regret this purchase.",
        "Save yourself the trouble.",
        "Not happy at all.",
    ],
    "neutral": [
        "It's fine overall.",
        "Three stars.",
        "Nothing more to say.",
        "It does the job.",
        "Average, I guess.",
        "Neither great nor bad.",
        "It's okay.",
        "Make of that what you will.",
        "Fair enough.",
    ],
}
_REVIEW_PRODUCTS = [
    "phone",
    "tablet",
    "smartwatch",
    "laptop",
    "e-reader",
    "fitness tracker",
    "action camera",
    "handheld console",
    "dash cam",
    "GPS watch",
]


def gen_sentiment_aspect(seed: int, n_train: int, n_test: int) -> dict:
    labels = [f"{s}, {a}" for a in ASPECTS for s in SENTIMENTS]
    pools = {}
    for (a, s), cores in REVIEW_CORES.items():
        pools[("core", f"{s}, {a}")] = split_pool(f"review/core/{a}/{s}", cores, seed)
    for s, closers in REVIEW_CLOSERS.items():
        pools[("closer", s)] = split_pool(f"review/closer/{s}", closers, seed)
    pools["opener"] = split_pool("review/opener", REVIEW_OPENERS, seed)

    def make(split: str, rng: Random, label: str):
        sentiment = label.split(", ")[0]
        cores = pools[("core", label)][split]
        n_core = 2 if rng.random() < 0.35 else 1
        body = rng.sample(cores, n_core)
        if rng.random() < 0.6:
            body.insert(0, rng.choice(pools["opener"][split]))
        if rng.random() < 0.55:
            body.append(rng.choice(pools[("closer", sentiment)][split]))
        template = text_noise(join_parts(body), rng, typo_p=0.2, abbrev_p=0.05)
        values = {
            "product": rng.choice(_REVIEW_PRODUCTS),
            "period": rng.choice(["two weeks", "a month", "three months", "six months", "a year"]),
        }
        text = sentence_case(fill(template, values))
        text = case_noise(text, rng, lower_p=0.12, upper_p=0.0, nopunct_p=0.15)
        return text, body

    def rows(split, text, label):
        return {
            "messages": [
                {"role": "user", "content": text},
                {"role": "assistant", "content": label},
            ]
        }

    return _generate("sentiment_aspect", seed, labels, make, rows, n_train, n_test, lambda lab: lab)


# --------------------------------------------------------------------------------------------
# Generation driver, checks, writing
# --------------------------------------------------------------------------------------------


def _generate(
    task, seed, labels, make, rows, n_train, n_test, label_of, min_words=10, max_words=60
):
    """Balanced labels (round robin), unique texts, word count within bounds, shuffled."""
    out, used = {}, {}
    seen = set()
    for split, n in (("test", n_test), ("train", n_train)):
        rng = Random(f"{seed}/{task}/{split}")
        result = []
        used[split] = set()
        for i in range(n):
            label = labels[i % len(labels)]
            for _attempt in range(1000):
                text, phrasings = make(split, rng, label)
                if text is None or text in seen:
                    continue
                if not (min_words <= n_words(text) <= max_words):
                    continue
                break
            else:
                raise RuntimeError(f"{task}/{split}: could not make a new example for {label}")
            seen.add(text)
            used[split].update(phrasings)
            result.append(rows(split, text, label))
        rng.shuffle(result)
        out[split] = result
    shared = used["train"] & used["test"]
    if shared:  # the whole point: no opener, core, detail or closer template in both splits
        raise AssertionError(f"{task}: phrasings used in both train and test: {sorted(shared)[:5]}")
    out["_phrasings"] = {k: len(v) for k, v in used.items()}
    return out


def user_text(row: dict) -> str:
    return next(m["content"] for m in row["messages"] if m["role"] == "user")


def answer(row: dict) -> str:
    return row["messages"][-1]["content"]


def check_and_report(task: str, data: dict) -> list[str]:
    """Print distributions and return a list of problems (empty when all is well)."""
    problems = []
    train_texts = {user_text(r) for r in data["train"]}
    test_texts = [user_text(r) for r in data["test"]]
    leaked = [t for t in test_texts if t in train_texts]
    leaked_ci = [t for t in test_texts if t.lower() in {x.lower() for x in train_texts}]
    if leaked or leaked_ci:
        problems.append(f"{task}: {len(leaked_ci)} test user texts also appear in train")
    for split, rws in data.items():
        texts = [user_text(r) for r in rws]
        if len(set(texts)) != len(texts):
            problems.append(f"{task}/{split}: duplicate user texts")
        lens = [n_words(t) for t in texts]
        if task == "intent_slots":
            dist = Counter(parse_intent_answer(answer(r))["intent"] for r in rws)
        else:
            dist = Counter(answer(r) for r in rws)
        print(
            f"{task}/{split}: {len(rws)} rows, words min/mean/max "
            f"{min(lens)}/{sum(lens) / len(lens):.1f}/{max(lens)}, {len(set(map(answer, rws)))} distinct answers"
        )
        print("   " + ", ".join(f"{k}={v}" for k, v in sorted(dist.items())))
        if task == "sentiment_aspect":
            for key, idx in (("sentiment", 0), ("aspect", 1)):
                c = Counter(answer(r).split(", ")[idx] for r in rws)
                print(f"   by {key}: " + ", ".join(f"{k}={v}" for k, v in sorted(c.items())))
    return problems


TASKS = {
    "tickets": (gen_tickets, 600, 100),
    "intent_slots": (gen_intent_slots, 500, 100),
    "sentiment_aspect": (gen_sentiment_aspect, 500, 100),
}


def dumps_rows(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def build(seed: int) -> tuple[dict, list[str]]:
    """All files as {relative path: content}, plus any problems found."""
    files, problems = {}, []
    for task, (gen, n_train, n_test) in TASKS.items():
        data = gen(seed, n_train, n_test)
        n_phr = data.pop("_phrasings")
        print(
            f"{task}: distinct phrasing templates used: train {n_phr['train']}, test {n_phr['test']}, shared 0"
        )
        problems += check_and_report(task, data)
        files[f"{task}/train.jsonl"] = dumps_rows(data["train"])
        files[f"{task}/test.jsonl"] = dumps_rows(data["test"])
        if task == "tickets":
            prompts = [
                {"messages": [m for m in r["messages"] if m["role"] != "assistant"]}
                for r in data["test"]
            ]
            files[f"{task}/test_prompts.jsonl"] = dumps_rows(prompts)
    return files, problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "data"))
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument(
        "--check", action="store_true", help="compare with the files on disk, write nothing"
    )
    args = ap.parse_args(argv)
    files, problems = build(args.seed)
    for p in problems:
        print("PROBLEM:", p, file=sys.stderr)
    out = Path(args.out)
    if args.check:
        stale = [
            rel
            for rel, content in files.items()
            if not (out / rel).exists() or (out / rel).read_text(encoding="utf-8") != content
        ]
        for rel in stale:
            print(f"differs from a fresh generation: {out / rel}", file=sys.stderr)
        return 1 if (stale or problems) else 0
    for rel, content in files.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write(content)
    print(f"wrote {len(files)} files under {out}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
