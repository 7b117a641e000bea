"""English-like sentences from a small probabilistic grammar, for the offline demo.

Two domains share their vocabulary but not their distribution:

* ``"general"``: everyday and news-like text (people, towns, weather, sport,
  prices, opinions on books and shows), with about one sentence in ten a
  movie review, as in web text. The offline zoo is pretrained on it.
* ``"reviews"``: movie-review-like text only (acting, plot, praise and
  complaints), the demo's task data. A model pretrained on general text knows
  these words and has seen a few such sentences, so fine-tuning on reviews
  really lowers its perplexity, and a larger model starts out better.

Sentences are lower case, without punctuation, 4 to 25 words long, e.g.
``the acting is wonderful but the plot drags on far too long``. Short review
sentences repeat now and then (as "ten out of ten" does in real reviews), so
two samples, or a review sample and the general corpus, can share a few.

Generation is a pure function of ``(n, seed, domain)``: it uses its own
``random.Random`` seeded with a string (hashed with SHA-512 by the standard
library, so ``PYTHONHASHSEED`` does not matter) and never the global RNG.
"""

from __future__ import annotations

import random
import re
from typing import Literal, Mapping, Sequence

Domain = Literal["general", "reviews"]

MIN_WORDS = 4
MAX_WORDS = 25

# A rule maps a nonterminal to weighted expansions. An expansion is a string of
# words and <nonterminals>; "" is the empty expansion (an optional slot).
Rules = Mapping[str, Sequence[tuple[str, float]]]


def _alternatives(words: str, weight: float = 1.0) -> list[tuple[str, float]]:
    """Equal-weight expansions from a ``|``-separated string of phrases."""
    return [(phrase.strip(), weight) for phrase in words.split("|")]


# Words and phrases both domains use: people, time, places, degrees.
_SHARED: dict[str, list[tuple[str, float]]] = {
    "DEG?": [("", 3.0)] + _alternatives("very|really|quite|rather|so|pretty|truly|a bit|not very"),
    "TIME": _alternatives(
        "today|yesterday|last night|last week|this morning|on monday|on friday|on sunday|every day"
        "|in the evening|after work|at the weekend|last year|this summer|in the winter|two days ago"
    ),
    "TIME?": [("", 3.0), ("<TIME>", 1.0)],
    "PLACE": _alternatives(
        "in the park|at the station|near the river|in the city|at home|in the kitchen|at the market"
        "|downtown|by the lake|at school|in the village|on the beach|at the office|in the garden"
        "|on the train|at the cinema|in the old town|by the sea"
    ),
    # Singular only: "my <RELATIVE> walks the dog" must agree.
    "RELATIVE": _alternatives(
        "mother|father|sister|brother|wife|husband|son|daughter|cousin|aunt|grandfather"
        "|neighbor|best friend|grandmother|uncle"
    ),
    "PERSON": _alternatives(
        "man|woman|child|teacher|doctor|farmer|driver|student|neighbor|officer|worker|nurse|chef"
        "|writer|singer|player|mayor|scientist|baker|pilot|manager|coach|judge|artist|engineer"
    ),
    "GENRE": _alternatives("comedy|thriller|drama|horror film|love story|war film|musical|western|cartoon|mystery"),
    # Opinion words: reviews are made of them, general text uses them now and then.
    "PART": _alternatives(
        "acting|plot|script|story|ending|dialogue|pacing|cinematography|soundtrack|music"
        "|cast|direction|camera work|humor|editing|lead actor|lead actress|villain|twist|opening scene"
    ),
    "PART_PL": _alternatives("characters|actors|jokes|action scenes|special effects|songs|performances|fight scenes"),
    "POS_ADJ": _alternatives(
        "wonderful|great|brilliant|beautiful|moving|charming|clever|funny|gripping|stunning"
        "|superb|excellent|delightful|touching|solid|fresh|smart|good|lovely|warm|strong|perfect"
    ),
    "NEG_ADJ": _alternatives(
        "boring|dull|weak|predictable|silly|bland|messy|slow|awful|terrible|flat|forgettable"
        "|tedious|clumsy|lazy|confusing|painful|bad|cheap|empty|long"
    ),
    "GENRE_PL": _alternatives("comedies|thrillers|dramas|horror films|love stories|war films|musicals|westerns|mysteries"),
    "BEST": _alternatives("best|funniest|most moving|most beautiful|smartest|most original"),
    "NEG_VP": _alternatives(
        "drags on far too long|falls apart in the last act|never really goes anywhere"
        "|makes no sense at all|feels like it was written in a hurry|goes on and on"
        "|is full of holes|tries too hard to be funny|is hard to follow|loses its way in the middle"
        "|has nothing new to say|is far too slow"
    ),
    "NUMBER": _alternatives("two|three|four|five|six|ten|twenty|a hundred|a few|several"),
}

_GENERAL: dict[str, list[tuple[str, float]]] = {
    "S": [
        ("<NEWS>", 4.0),
        ("<DAILY>", 4.0),
        ("<NARRATIVE>", 4.0),
        ("<WEATHER>", 2.0),
        ("<SPORT>", 2.0),
        ("<OPINION>", 2.0),
        ("<NARRATIVE> <CONJ> <NARRATIVE>", 2.0),
        ("<DAILY> <CONJ> <NARRATIVE>", 1.0),
        ("<LEISURE>", 1.5),
        ("<CULTURE>", 2.5),
        # Like web text, general text holds a few reviews: pretraining sees the task's
        # kind of sentence, but at a tenth of the rate fine-tuning will.
        ("<REVIEW>", 2.5),
    ],
    "CONJ": _alternatives("and|but|because|so|while|after|before|when"),
    "NEWS": [
        ("<OFFICIALS> said that <NEWS_FACT>", 3.0),
        ("<OFFICIALS> announced that <NEWS_FACT>", 2.0),
        ("<TIME> <OFFICIALS> said that <NEWS_FACT>", 1.0),
        ("according to <OFFICIALS> <NEWS_FACT>", 1.0),
        ("scientists found that <SCIENCE_FACT>", 1.5),
        ("a new study shows that <SCIENCE_FACT>", 1.0),
        ("<NUMBER> people were <NEWS_PASSIVE> after <EVENT> <PLACE>", 1.5),
    ],
    "OFFICIALS": _alternatives(
        "the city council|the mayor|the police|the government|local officials|the company"
        "|the school board|the bank|the hospital|a spokesman|the minister|the union"
    ),
    "NEWS_FACT": [
        ("the <ADJ_GEN?> <THING> will <FUTURE_VERB> <FUTURE_TIME>", 3.0),
        ("the price of <GOODS> <CHANGED> <AMOUNT?>", 2.0),
        ("<NUMBER> new <BUILDING_PL> will be built <PLACE>", 1.5),
        ("the <BUILDING> <PLACE> will stay closed until <FUTURE_TIME>", 1.5),
        ("the plan to <PLAN_VERB> the <BUILDING> was <DECISION>", 1.5),
        ("more <PEOPLE_PL> are <GERUND> to work than ever before", 1.0),
        ("the <EVENT> caused <ADJ_DAMAGE> damage <PLACE>", 1.0),
        ("taxes will <GO> up <FUTURE_TIME>", 0.5),
    ],
    "SCIENCE_FACT": [
        ("the <NATURE> is getting <COMPARATIVE> every year", 1.0),
        ("<ANIMAL_PL> can <ANIMAL_VERB> <COMPARATIVE_ADV> than we thought", 1.0),
        ("people who <HABIT_VERB> every day <LIVE> longer", 1.0),
        ("the <NATURE> was <COMPARATIVE> than <PAST_TIME>", 1.0),
        ("children learn <COMPARATIVE_ADV> when they <HABIT_VERB>", 0.7),
    ],
    "NEWS_PASSIVE": _alternatives("hurt|rescued|moved|stopped|evacuated|helped"),
    "EVENT": _alternatives("the storm|the fire|the flood|the accident|the crash|the strike|the power cut"),
    "ADJ_DAMAGE": _alternatives("heavy|serious|minor|some|little|widespread"),
    "FUTURE_VERB": _alternatives("open|close|reopen|be finished|be repaired|cost more|be delayed|move"),
    "FUTURE_TIME": _alternatives("next month|next year|in the spring|by the end of the year|next week|in june|soon"),
    "PAST_TIME": _alternatives("last year|ten years ago|a century ago|in the past|before"),
    "GOODS": _alternatives("bread|milk|coffee|fuel|rice|eggs|housing|electricity|train tickets|fruit"),
    "CHANGED": _alternatives("rose|fell|went up|went down|doubled|stayed the same"),
    "AMOUNT?": [("", 2.0)] + _alternatives("again|this week|by ten percent|for the third month|sharply|slightly"),
    "GO": _alternatives("go"),
    "BUILDING": _alternatives(
        "library|hospital|school|bridge|station|museum|swimming pool|market|post office|stadium|theater"
    ),
    "BUILDING_PL": _alternatives("schools|houses|homes|parks|shops|roads|bike lanes|flats"),
    "PLAN_VERB": _alternatives("close|sell|rebuild|replace|extend|move"),
    "DECISION": _alternatives("approved|rejected|delayed|dropped|put on hold|welcomed by most people"),
    "PEOPLE_PL": _alternatives("people|workers|students|families|young people|older people"),
    "GERUND": _alternatives("walking|cycling|driving|taking the bus|taking the train"),
    "NATURE": _alternatives("sea|river|lake|forest|air|summer|weather|ice|soil|water"),
    "COMPARATIVE": _alternatives("warmer|colder|cleaner|dirtier|drier|wetter|smaller|bigger|older"),
    "COMPARATIVE_ADV": _alternatives("better|faster|more|longer|further"),
    "ANIMAL_PL": _alternatives("dogs|cats|birds|horses|bees|fish|whales|crows|foxes"),
    "ANIMAL_VERB": _alternatives("remember|hear|see|learn|count|swim|travel"),
    "HABIT_VERB": _alternatives("walk|read|sleep well|cook at home|play music|swim|laugh|garden"),
    "LIVE": _alternatives("live|stay healthy|feel happier|sleep better"),
    "DAILY": [
        ("my <RELATIVE> <HABIT> <PLACE?> <FREQ>", 3.0),
        ("i <HABIT_I> <PLACE?> <FREQ>", 3.0),
        ("we usually <HABIT_I> <PLACE> <FREQ?>", 1.5),
        ("on <DAY> i <HABIT_I> and then <HABIT_I>", 1.0),
        ("every <PART_OF_DAY> my <RELATIVE> <HABIT>", 1.0),
    ],
    "PLACE?": [("", 1.0), ("<PLACE>", 1.0)],
    "FREQ": _alternatives(
        "every morning|every evening|on weekends|twice a week|most days|before work|after dinner"
        "|once a month|when it rains|when the weather is nice"
    ),
    "FREQ?": [("", 1.0), ("<FREQ>", 1.0)],
    "DAY": _alternatives("monday|tuesday|wednesday|thursday|friday|saturday|sunday|weekends|holidays"),
    "PART_OF_DAY": _alternatives("morning|evening|night|afternoon|weekend"),
    "HABIT": _alternatives(
        "walks the dog|reads the paper|makes coffee|goes for a run|takes the bus|cooks dinner"
        "|calls me|works late|plays the piano|waters the plants|goes swimming|feeds the birds"
        "|cleans the house|drives to work|listens to the radio|buys fresh bread"
    ),
    "HABIT_I": _alternatives(
        "walk the dog|read the paper|make coffee|go for a run|take the bus|cook dinner"
        "|call my mother|work late|play the piano|water the plants|go swimming|feed the birds"
        "|clean the house|drive to work|listen to the radio|buy fresh bread|visit my parents"
    ),
    "NARRATIVE": [
        ("the <ADJ_GEN?> <PERSON> <VT_PAST> the <ADJ_GEN?> <THING> <PLACE?> <TIME?>", 4.0),
        ("my <RELATIVE> <VT_PAST> a <ADJ_GEN?> <THING> <TIME?>", 2.0),
        ("the <PERSON> <VI_PAST> <PLACE> <TIME?>", 2.0),
        ("a <ADJ_GEN?> <ANIMAL> <VI_PAST> <PLACE>", 1.5),
        ("the <ANIMAL> <VT_PAST> the <THING> and <VI_PAST>", 1.0),
        ("we <VT_PAST> the <THING> <PLACE> <TIME?>", 1.5),
        ("i <VT_PAST> an old <THING> <PLACE>", 1.0),
        ("nobody <VT_PAST> the <THING> until the <PERSON> <VI_PAST>", 0.5),
    ],
    "ADJ_GEN": _alternatives(
        "old|new|small|big|quiet|busy|cold|warm|bright|dark|heavy|empty|local|young|tall"
        "|early|late|long|short|green|red|blue|happy|tired|careful|strong|famous|strange|lucky"
    ),
    "ADJ_GEN?": [("", 2.0), ("<ADJ_GEN>", 1.0)],
    "THING": _alternatives(
        "car|house|book|letter|bridge|road|train|bus|garden|window|door|table|phone|bag|bike"
        "|boat|shop|key|box|map|ticket|picture|clock|chair|lamp|fence|roof|report|plan|photo|song"
    ),
    "ANIMAL": _alternatives("dog|cat|horse|bird|cow|fox|goat|duck|rabbit|crow"),
    "VT_PAST": _alternatives(
        "opened|closed|built|sold|bought|found|lost|repaired|painted|cleaned|visited|watched"
        "|carried|checked|moved|fixed|read|wrote|signed|borrowed|broke|missed|forgot|dropped|stole"
    ),
    "VI_PAST": _alternatives(
        "arrived|left|waited|slept|smiled|laughed|worked|stayed|walked|ran away|fell asleep"
        "|returned|disappeared|sat down|shouted|cried|got lost"
    ),
    "WEATHER": [
        ("it will be <WEATHER_ADJ> and <WEATHER_ADJ> <REGION> <WHEN_WEATHER>", 3.0),
        ("<WEATHER_NOUN> is expected <REGION> <WHEN_WEATHER>", 2.0),
        ("it rained all day <TIME> so we stayed <INDOORS>", 1.0),
        ("the sun came out <TIME> and the <NATURE> was <WEATHER_ADJ>", 1.0),
    ],
    "WEATHER_ADJ": _alternatives("cold|warm|wet|dry|windy|sunny|cloudy|cool|hot|mild|foggy|grey"),
    "WEATHER_NOUN": _alternatives("rain|snow|heavy rain|strong wind|a storm|fog|sunshine|frost"),
    "REGION": _alternatives("in the north|in the south|along the coast|in the hills|in the east|in the west|across the country"),
    "WHEN_WEATHER": _alternatives("tomorrow|tonight|this weekend|on monday|for the rest of the week|later today"),
    "INDOORS": _alternatives("at home|inside|in bed|in the kitchen"),
    "SPORT": [
        ("the <TEAM_ADJ?> team <WON_LOST> the <MATCH> <SCORE?>", 3.0),
        ("the <PERSON> scored <NUMBER> goals in the <ORDINAL> half", 1.0),
        ("our team <WON_LOST> again <TIME> and the coach was <FEELING>", 1.5),
        ("<NUMBER> thousand fans watched the <MATCH> <PLACE>", 1.0),
        ("the <ORDINAL> race was <DEG?> <ADJ_EVENT>", 1.0),
    ],
    "TEAM_ADJ?": [("", 1.0)] + _alternatives("home|local|young|visiting|national|school"),
    "WON_LOST": _alternatives("won|lost|drew|played"),
    "MATCH": _alternatives("match|game|final|cup final|derby|race"),
    "SCORE?": [("", 1.0)] + _alternatives("by two goals|in the last minute|after extra time|on penalties|by a single point"),
    "ORDINAL": _alternatives("first|second|third|last"),
    "FEELING": _alternatives("happy|angry|proud|disappointed|tired|surprised|pleased"),
    "ADJ_EVENT": _alternatives("exciting|long|close|fast|slow|boring|wonderful|strange"),
    "OPINION": [
        ("i think the <ADJ_GEN?> <BUILDING> is a <GOOD_BAD> place to <ACTIVITY>", 2.0),
        ("in my opinion <GOODS> is <DEG?> <PRICEY> <TIME?>", 1.0),
        ("my <RELATIVE> says the <THING> is <DEG?> <ADJ_GEN>", 1.5),
        ("it is <DEG?> <HARD_EASY> to <ACTIVITY> <PLACE>", 1.5),
    ],
    "GOOD_BAD": _alternatives("good|great|nice|terrible|strange|lovely|quiet|busy"),
    "ACTIVITY": _alternatives("study|meet friends|relax|work|read|have lunch|take photos|park a car|find a seat"),
    "PRICEY": _alternatives("expensive|cheap|hard to find|easy to find"),
    "HARD_EASY": _alternatives("hard|easy|nice|difficult|cheap|expensive|pleasant"),
    "LEISURE": [
        ("we watched a <GENRE> at the cinema <TIME>", 1.0),
        ("my <RELATIVE> read a <ADJ_GEN?> book about <TOPIC> <TIME?>", 1.0),
        ("the <ADJ_GEN?> band played <PLACE> <TIME>", 1.0),
        ("there is a new <SHOW> about <TOPIC> on television", 0.7),
        ("the festival <PLACE> will show <NUMBER> films <FUTURE_TIME>", 0.5),
    ],
    # Opinions on books, shows and restaurants: the review vocabulary in another distribution.
    "CULTURE": [
        ("my <RELATIVE> says the new <WORK> is <DEG?> <ADJ_ANY>", 1.5),
        ("critics called the new <WORK> <DEG?> <ADJ_ANY>", 1.0),
        ("the <WORK> was <DEG?> <NEG_ADJ> but the <PART> was <POS_ADJ>", 1.0),
        ("the <WORK> was <DEG?> <POS_ADJ> but the <PART> was <NEG_ADJ>", 1.0),
        ("the new restaurant <PLACE> is <DEG?> <POS_ADJ> but the service is <NEG_ADJ>", 1.0),
        ("we watched a <GENRE> at home <TIME> and it was <DEG?> <ADJ_ANY>", 1.0),
        ("the <PART> of the new <SHOW> is <DEG?> <ADJ_ANY>", 1.0),
        ("the <PART_PL> in the <WORK> were <DEG?> <ADJ_ANY>", 1.0),
        ("many people think the <WORK> is one of the <BEST> <WORK_PL> of the year", 0.7),
        ("the <WORK> about <TOPIC> <NEG_VP>", 0.7),
        ("the <ADJ_GEN?> <PERSON> wrote a <ADJ_ANY> <WORK> about <TOPIC>", 0.7),
    ],
    "WORK": _alternatives("book|film|movie|play|show|concert|album|series|novel|exhibition|musical|comedy"),
    "WORK_PL": _alternatives("books|films|movies|plays|shows|albums|novels|exhibitions"),
    "ADJ_ANY": [("<POS_ADJ>", 1.0), ("<NEG_ADJ>", 1.0)],
    "SHOW": _alternatives("series|show|documentary|film"),
    "TOPIC": _alternatives("the war|the sea|old trains|cooking|the city|birds|space|a famous painter|the history of music"),
}

_REVIEWS: dict[str, list[tuple[str, float]]] = {
    "REVIEW": [
        ("<POSITIVE>", 4.0),
        ("<NEGATIVE>", 4.0),
        ("<MIXED>", 3.0),
        ("<CONTEXT> and <REACTION>", 1.5),
        ("<POSITIVE> and <POS_TAIL>", 1.0),
        ("<NEGATIVE> and <NEG_TAIL>", 1.0),
    ],
    "FILM": _alternatives("film|movie|film|movie|picture|<GENRE>"),
    "SUBJ": [("the <PART>", 4.0), ("the <FILM>", 1.0), ("this <FILM>", 1.0)],
    "WORST": _alternatives("worst|dullest|silliest|most boring|most confusing|laziest"),
    "SEEN_WHEN": _alternatives("this year|in years|in a long time|in my life|since i was a kid|in ages"),
    "LOVED": _alternatives("loved|really enjoyed|enjoyed|adored|liked|was moved by|laughed all the way through"),
    "HATED": _alternatives("hated|did not enjoy|could not stand|regret watching|was bored by|walked out of"),
    "FROM_START?": [("", 2.0)] + _alternatives("from start to finish|from the first scene|every minute of it|more than i expected"),
    "ROLE_PERSON": _alternatives("the lead actor|the lead actress|the young star|the director|the whole cast|the villain"),
    "ROLE_NOUN": _alternatives("father|mother|detective|teacher|soldier|doctor|young woman|old man|police officer|singer"),
    "POSITIVE": [
        ("<SUBJ> is <DEG?> <POS_ADJ>", 4.0),
        ("i <LOVED> this <FILM> <FROM_START?>", 3.0),
        ("this is one of the <BEST> <FILMS> i have seen <SEEN_WHEN>", 2.0),
        ("<ROLE_PERSON> gives a <POS_ADJ> performance as the <ROLE_NOUN>", 2.0),
        ("a <POS_ADJ> <GENRE> with <POS_ADJ> <PART_PL> and a <POS_ADJ> ending", 2.0),
        ("the director does a <POS_ADJ> job with a <DEG?> <POS_ADJ> story", 1.5),
        ("i would recommend it to anyone who likes <GENRE_PL> <BECAUSE_POS?>", 1.0),
        ("<SUBJ> kept me <HOOKED> until the very end", 1.0),
        ("<RATING_POS>", 0.4),
        ("go and see it <AT_ONCE>", 0.5),
    ],
    "NEGATIVE": [
        ("<SUBJ> is <DEG?> <NEG_ADJ>", 4.0),
        ("i <HATED> this <FILM> <BECAUSE_NEG?>", 2.0),
        ("this is one of the <WORST> <FILMS> i have seen <SEEN_WHEN>", 2.0),
        ("do not waste your time on this <NEG_ADJ?> <FILM> <BECAUSE_NEG?>", 0.8),
        ("<SUBJ> <NEG_VP>", 3.0),
        ("even the <PART> could not save this <NEG_ADJ> <FILM>", 1.5),
        ("a <NEG_ADJ> <GENRE> with <NEG_ADJ> <PART_PL> and a <NEG_ADJ> ending", 2.0),
        ("i wanted to like this <FILM> but <SUBJ> is <DEG?> <NEG_ADJ>", 1.5),
        ("<RATING_NEG>", 0.4),
    ],
    "MIXED": [
        ("<SUBJ> is <DEG?> <POS_ADJ> but <SUBJ> <NEG_VP>", 3.0),
        ("<SUBJ> is <DEG?> <POS_ADJ> but <SUBJ> is <DEG?> <NEG_ADJ>", 2.0),
        ("the first half is <POS_ADJ> but the second half is <NEG_ADJ>", 1.5),
        ("<SUBJ> is <NEG_ADJ> but <ROLE_PERSON> is <DEG?> <POS_ADJ>", 1.5),
        ("not a <BAD_GOOD> <FILM> but <SUBJ> could have been <COMPARATIVE_R>", 1.0),
    ],
    "BECAUSE_NEG?": [("", 1.0), ("because <SUBJ> is <DEG?> <NEG_ADJ>", 1.5), ("from start to finish", 0.5)],
    "BECAUSE_POS?": [("", 1.0), ("because <SUBJ> is <DEG?> <POS_ADJ>", 1.5), ("and to the whole family", 0.5)],
    "FILMS": _alternatives("films|movies|films|<GENRE_PL>"),
    "NEG_ADJ?": [("", 2.0), ("<NEG_ADJ>", 1.0)],
    "HOOKED": _alternatives("hooked|guessing|smiling|on the edge of my seat|laughing"),
    "AT_ONCE": _alternatives("now|at the cinema|with your friends|with the whole family|twice"),
    "BAD_GOOD": _alternatives("bad|terrible|great|perfect"),
    "COMPARATIVE_R": _alternatives("better|shorter|funnier|much better|a lot shorter|more fun"),
    "RATING_POS": _alternatives("ten out of ten|five stars from me|a must see|easily the best film of the year|worth every penny"),
    "RATING_NEG": _alternatives("one star at most|two out of ten|a total waste of money|not worth the ticket|skip this one"),
    "POS_TAIL": _alternatives(
        "i will watch it again|my <RELATIVE> loved it too|the music is <POS_ADJ>|the ending made me cry"
        "|i cannot wait for the sequel"
    ),
    "NEG_TAIL": _alternatives(
        "i almost fell asleep|my <RELATIVE> left early|the ending is even worse|i want my money back"
        "|nobody laughed"
    ),
    "CONTEXT": _alternatives(
        "i watched this <FILM> <TIME> with my <RELATIVE>|we saw it <PLACE> <TIME>"
        "|i went to see this <FILM> <TIME>|my <RELATIVE> took me to see it <TIME>"
    ),
    "REACTION": _alternatives(
        "we both <LOVED> it|we both <HATED> it|it was <DEG?> <POS_ADJ>|it was <DEG?> <NEG_ADJ>"
        "|i laughed the whole time|i was bored after ten minutes|it was better than the book"
    ),
}

# The general grammar embeds the review grammar, so no nonterminal may be defined twice.
if _SHARED.keys() & _GENERAL.keys() or _SHARED.keys() & _REVIEWS.keys() or _GENERAL.keys() & _REVIEWS.keys():
    raise RuntimeError("ftflow.synthetic: a nonterminal is defined in two rule tables")
_GRAMMARS: dict[str, Rules] = {
    "general": {**_SHARED, **_GENERAL, **_REVIEWS},
    "reviews": {**_SHARED, **_REVIEWS, "S": [("<REVIEW>", 1.0)]},
}

_NONTERMINAL = re.compile(r"<([A-Z_?]+)>")


def _expand(symbol: str, grammar: Rules, rng: random.Random, depth: int = 0) -> list[str]:
    """Words of one random derivation of ``symbol``."""
    if depth > 20:  # The grammar is not recursive; this only guards against editing mistakes.
        raise RecursionError(f"grammar too deep at <{symbol}>")
    expansions = grammar[symbol]
    choice = rng.choices([text for text, _ in expansions], weights=[w for _, w in expansions])[0]
    words: list[str] = []
    for token in choice.split():
        match = _NONTERMINAL.fullmatch(token)
        if match:
            words.extend(_expand(match.group(1), grammar, rng, depth + 1))
        else:
            words.append(token)
    return words


def _with_articles(words: list[str]) -> list[str]:
    """``a`` becomes ``an`` before a vowel sound (the grammar picks articles blindly)."""
    fixed = list(words)
    for i, word in enumerate(words[:-1]):
        following = words[i + 1]
        if word == "a" and following[0] in "aeiou" and not following.startswith(("one", "uni", "use", "eu")):
            fixed[i] = "an"
    return fixed


def generate_sentences(n: int, seed: int, domain: Domain) -> list[str]:
    """Generate ``n`` sentences of one domain, deterministically.

    Args:
        n: number of sentences (>= 0). Repeats are possible, as in real text.
        seed: seed of the generator; the same ``(n, seed, domain)`` always gives
            the same list, and the first ``k`` sentences do not depend on ``n``.
        domain: ``"general"`` (pretraining text) or ``"reviews"`` (task text).

    Returns:
        ``n`` lower-case sentences of 4 to 25 words, words separated by one space.
    """
    if domain not in _GRAMMARS:
        raise ValueError(f"domain must be one of {sorted(_GRAMMARS)}, got {domain!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    grammar = _GRAMMARS[domain]
    # A string seed is hashed with SHA-512 by `random`, so it is stable across runs and
    # platforms, and the two domains never share a random stream.
    rng = random.Random(f"ftflow.synthetic/{domain}/{seed}")
    sentences: list[str] = []
    while len(sentences) < n:
        words = _with_articles(_expand("S", grammar, rng))
        # Rejection keeps every sentence in the documented length range.
        if MIN_WORDS <= len(words) <= MAX_WORDS:
            sentences.append(" ".join(words))
    return sentences


def vocabulary(domain: Domain) -> frozenset[str]:
    """Every word the grammar of ``domain`` can produce."""
    grammar = _GRAMMARS[domain]
    words = set()
    for expansions in grammar.values():
        for text, _ in expansions:
            words.update(token for token in text.split() if not _NONTERMINAL.fullmatch(token))
    if "a" in words:
        words.add("an")  # written by _with_articles
    return frozenset(words)
