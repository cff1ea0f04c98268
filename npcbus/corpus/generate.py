"""Deterministic generator of the small corpus that the offline default model is trained on.

The corpus is original text written for npcbus: handwritten passages plus sentence templates
about a small fantasy world (villages, taverns, smiths, guards, merchants, quests, weather and
trade), filled from handwritten word lists with a seeded random generator. Its output, the
``*.txt`` files next to this script, is committed, so building the model never runs this script.

Run ``python -m npcbus.corpus.generate`` to rewrite the files (same seed: same bytes), or
``python -m npcbus.corpus.generate --check`` to verify that the committed files are current.

Files written:

- ``lore.txt``: prose about places, people, history, trade and weather.
- ``dialogue.txt``: short scenes in script form (``Name: line``) and NPC response logs, one
  JSON object per line.
- ``chat.txt``: conversations in a plain role format, one line per message,
  ``system:``/``user:``/``assistant:``; the assistant answers with a JSON NPC response. The
  model builder turns each block into the tokenizer's chat template.

Documents are separated by one blank line in every file.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

SEED = 20261126
HERE = Path(__file__).resolve().parent

# --------------------------------------------------------------------------------------------
# Word lists
# --------------------------------------------------------------------------------------------

FIRST_NAMES = [
    "Brena", "Tomas", "Maren", "Oswin", "Hilde", "Corwin", "Ysolde", "Dunstan", "Petra", "Fennick",
    "Garrow", "Ilsa", "Jory", "Kestrel", "Lune", "Mabry", "Nell", "Orrin", "Pim", "Quenna",
    "Rowan", "Sable", "Tamsin", "Ulric", "Vesna", "Wendel", "Yara", "Zeb", "Edda", "Bram",
    "Cress", "Dora", "Ewan", "Fidda", "Gideon", "Hollis", "Ivo", "Jessamy", "Kit", "Lorcan",
    "Mirela", "Noll", "Odette", "Perrin", "Runa", "Silas", "Teodor", "Una", "Varo", "Wren",
]
SURNAMES = [
    "Ashdown", "Barrowby", "Cobble", "Dunmere", "Fairweather", "Greythorn", "Hollowell", "Ironside",
    "Kettleby", "Larkspur", "Millbrook", "Northcott", "Oakhart", "Pennywhistle", "Quarrel",
    "Redfern", "Saltmarsh", "Thistlewood", "Underhill", "Wickham", "Bellwether", "Coldwell",
    "Harrow", "Marsh", "Stoneleigh",
]
VILLAGES = [
    "Oakford", "Thornwick", "Ashby Cross", "Greywater", "Hollowmere", "Brindle Hill", "Saltcombe",
    "Fenwick", "Kettle Rock", "Lanternfall", "Mossgate", "Redbarrow", "Stillwater", "Wyndham Ford",
    "Cinderholt", "Dunmore", "Elmstead", "Harrowgate", "Low Tarn", "Pebblewick",
]
REGIONS = [
    "the Greywater Vale", "the Ashen Marches", "the Saltcoast", "the Northern Fells",
    "the Sunken Weald", "the Copper Hills", "the Moors of Ebb", "the Lantern Coast",
]
CITIES = ["Caer Vannet", "Highmarket", "Port Sorrel", "Velmora"]
TAVERNS = [
    "The Crooked Kettle", "The Drowsy Badger", "The Lantern and Oar", "The Three Ravens",
    "The Gilded Turnip", "The Salt Barrel", "The Singing Anvil", "The Last Candle",
    "The Muddy Boot", "The Wandering Ox", "The Sleeping Goose", "The Broken Wheel",
]
PROFESSIONS = [
    "blacksmith", "innkeeper", "guard", "merchant", "herbalist", "fisher", "farmer", "miller",
    "baker", "hunter", "priest", "scholar", "stablehand", "carpenter", "weaver", "ferryman",
    "miner", "bard", "apothecary", "cartographer",
]
GOODS = [
    "iron nails", "horseshoes", "wool cloth", "dried fish", "salt", "barley", "honey", "candles",
    "lamp oil", "rope", "copper pots", "leather boots", "healing herbs", "smoked ham", "apples",
    "cheese", "arrows", "whetstones", "lanterns", "maps", "turnips", "rye bread", "cider",
    "linen", "tallow", "pickled onions", "goat milk", "wax tablets", "sheep skins", "pepper",
]
WEAPONS = [
    "sword", "axe", "spear", "dagger", "mace", "cleaver", "shield", "helmet", "mail shirt",
    "crossbow", "longbow", "warhammer",
]
METALS = ["iron", "steel", "bronze", "copper", "silver"]
DRINKS = ["ale", "dark beer", "pear cider", "mulled wine", "honey mead", "plum brandy", "barley tea"]
DISHES = [
    "mutton stew", "fish pie", "barley soup", "roast goose", "onion bread", "pork and beans",
    "eel pie", "mushroom porridge", "apple cake", "cheese dumplings",
]
THREATS = [
    "wolves", "bandits", "a river troll", "giant rats", "marsh lights", "a young wyvern",
    "goblins", "smugglers", "the restless dead", "a wild boar", "a bear", "highway robbers",
]
PLACES_NEAR = [
    "the old mill", "the watchtower", "the north road", "the ford", "the chapel ruins",
    "the salt mine", "the lighthouse", "the orchard", "the quarry", "the standing stones",
    "the east bridge", "the charcoal woods", "the abandoned farm", "the barrow mounds",
]
WEATHER = [
    "thick fog", "a cold drizzle", "hard frost", "a thunderstorm", "a dry heat", "heavy snow",
    "a sharp east wind", "clear skies", "hail", "a warm rain",
]
SEASONS = ["spring", "summer", "autumn", "winter"]
MONTHS = [
    "Thawmonth", "Seedmonth", "Bloommonth", "Highsun", "Haymonth", "Harvestide", "Leaffall",
    "Frostmonth", "Deepwinter",
]
COINS = ["copper pennies", "silver marks", "gold crowns"]
EMOTIONS = ["neutral", "happy", "angry", "sad", "afraid", "surprised", "curious", "suspicious", "grateful"]
ACTIONS = [
    "none", "give_item", "open_shop", "give_quest", "point_direction", "attack", "flee", "follow",
    "close_door", "refuse", "repair_item", "serve_drink",
]
ANIMALS = ["goat", "mule", "dog", "cat", "hen", "pony", "cow", "pig", "sheep", "goose"]
ITEMS = [
    "a silver ring", "a sealed letter", "a leather satchel", "an old map", "a brass key",
    "a wooden flute", "a family ledger", "a copper amulet", "a jar of ointment", "a lantern",
    "a bundle of arrows", "a carved box", "a pair of boots", "a fishing net",
]
GODS = ["the Lantern Mother", "old Harrow of the Fields", "the Tide Keeper", "the Smith in the Hill"]


_A_BEFORE_VOWEL = re.compile(r"\b([Aa]) (?=[aeiouAEIOU])")


def _articles(s: str) -> str:
    """Fix "a" before a vowel sound that a slot brought in ("a iron axe" -> "an iron axe")."""
    return _A_BEFORE_VOWEL.sub(lambda m: m.group(1) + "n ", s)


def _title(s: str) -> str:
    return s[0].upper() + s[1:]


class World:
    """Slot filler over the word lists; every choice comes from one seeded generator."""

    def __init__(self, rng: random.Random) -> None:
        self.r = rng

    def pick(self, items: list[str]) -> str:
        return self.r.choice(items)

    def name(self) -> str:
        return self.pick(FIRST_NAMES)

    def full_name(self) -> str:
        return f"{self.pick(FIRST_NAMES)} {self.pick(SURNAMES)}"

    def number(self, lo: int, hi: int) -> int:
        return self.r.randint(lo, hi)

    def price(self) -> str:
        coin = self.pick(COINS)
        n = {"copper pennies": (3, 40), "silver marks": (1, 15), "gold crowns": (1, 4)}[coin]
        k = self.number(*n)
        if k == 1:
            coin = coin.replace("pennies", "penny").replace("marks", "mark").replace("crowns", "crown")
        return f"{k} {coin}"

    def fill(self, template: str, extra: dict[str, str] | None = None) -> str:
        slots = {
            "name": self.name(), "name2": self.name(), "full": self.full_name(),
            "village": self.pick(VILLAGES), "village2": self.pick(VILLAGES),
            "region": self.pick(REGIONS), "city": self.pick(CITIES), "tavern": self.pick(TAVERNS),
            "job": self.pick(PROFESSIONS), "job2": self.pick(PROFESSIONS), "good": self.pick(GOODS),
            "good2": self.pick(GOODS), "weapon": self.pick(WEAPONS), "metal": self.pick(METALS),
            "drink": self.pick(DRINKS), "dish": self.pick(DISHES), "threat": self.pick(THREATS),
            "place": self.pick(PLACES_NEAR), "weather": self.pick(WEATHER), "season": self.pick(SEASONS),
            "month": self.pick(MONTHS), "price": self.price(), "price2": self.price(),
            "animal": self.pick(ANIMALS), "item": self.pick(ITEMS), "god": self.pick(GODS),
            "n": str(self.number(2, 12)), "years": str(self.number(3, 60)),
            "days": str(self.number(2, 9)), "miles": str(self.number(2, 30)),
        }
        if extra:
            slots.update(extra)
        slots["threat_cap"] = _title(slots["threat"])
        while slots["village2"] == slots["village"]:
            slots["village2"] = self.pick(VILLAGES)
        return _articles(template.format(**slots))


# --------------------------------------------------------------------------------------------
# Handwritten passages (used as they are)
# --------------------------------------------------------------------------------------------

PASSAGES = [
    """Oakford sits where the old king's road crosses the river Wend. The ford itself is shallow
enough for a cart in late summer and dangerous for a horse in spring, when snowmelt from the
Northern Fells turns the water brown and fast. The village grew up around the toll house, which
has not taken a toll in forty years. Now it is the home of the reeve, who keeps the village
chest, the seed corn and the only clock in the valley.""",
    """Every tavern in the Greywater Vale keeps a slate by the door. On it the keeper chalks the
price of ale, the name of the stew, and any news worth a traveler's ear: a bridge washed out,
a wedding on the next feast day, a reward for the return of a lost mule. Travelers read the
slate before they read the room, and a wise one reads both.""",
    """The smiths of the Copper Hills say that iron remembers. A blade quenched in anger will
crack on the first hard frost; a plough blade made on a feast day will turn the soil for a
lifetime. Nobody outside the hills believes this, and nobody inside them will work the forge
on the night of the new moon.""",
    """Guards in the border towns are paid in silver, bread and boots: one silver mark a week,
a loaf a day, and a new pair of boots every winter. The boots matter most. A guard who walks
the wall in wet leather from Frostmonth to Thawmonth will lose his toes, and a guard without
toes does not chase anyone.""",
    """Merchants on the Saltcoast weigh their goods on brass scales that the harbor master
checks every new moon. A merchant caught with a false weight pays a fine of twice the value of
everything on the stall, and his scales are hung on the harbor gate for a season so that
every buyer knows his face.""",
    """Nobody remembers who built the standing stones on Brindle Hill. The shepherds say they
were giants turned to rock for dancing on a holy day. The priests say they mark the graves of
the first kings. The children of the village say that if you walk around them nine times at
dusk you will hear music, and most of them have tried.""",
    """The ferry at Low Tarn is a flat raft on a rope, pulled across by a ferryman and his
mule. The fare is two copper pennies for a walker, five for a rider and a silver mark for a
loaded cart. When the water is high the ferryman will not cross at all, and no amount of coin
changes his mind.""",
    """Winter in the Northern Fells comes early and stays late. The first snow falls in
Leaffall, and the passes close a month later. Villages there lay in salt fish, smoked mutton,
turnips and barrels of dark beer, and they trade for lamp oil before the roads freeze. A family
without oil spends the long nights in the dark, telling the same stories again.""",
    """An innkeeper hears everything and repeats little. The rule of the trade is simple: a
guest's purse, a guest's secrets and a guest's horse are safe under the roof. Break the rule
once and the road learns of it within a month, and the rooms stay empty.""",
    """The quest board in Highmarket hangs beside the grain exchange. Anyone may pin a notice
to it for one copper penny: a lost ring, a stolen sheep, a cellar full of rats, an escort
wanted for the road to Port Sorrel. Most notices are taken down within a day. The ones that
stay up for a week are the ones worth being careful about.""",
    """Marsh lights drift over the fens south of Fenwick on still nights in autumn. Fishermen
say they are the lanterns of people drowned in the bog, still looking for the path home. They
say that if a light follows you, you must not turn around and you must not run; you walk home
at an even pace and close the door behind you.""",
    """A good blacksmith can tell the quality of iron by its sound. Strike a bar with a small
hammer and listen: good iron rings like a bell, poor iron answers with a dull knock. The smith
in Thornwick buys ore only after she has heard it ring, and she has turned away more than one
merchant who swore his metal was the best in the hills.""",
    """Harvest in the Greywater Vale ends with the last sheaf, which is cut by the youngest
reaper and carried to the tavern on a cart drawn by the oldest horse. The sheaf hangs over the
hearth until spring, when it is ploughed back into the first field. Farmers who skip the custom
blame it for every poor harvest that follows.""",
    """The road from Saltcombe to Caer Vannet is three days on foot and two on a good horse.
There are two inns on the way, both poor, and one bridge that the river takes every few years.
Merchants travel in groups of four carts or more, since the woods above the bridge have
sheltered robbers for as long as anyone has kept records.""",
    """A village guard's first duty is not fighting. It is knowing faces. The guard at the gate
of Redbarrow can name every farmer, every carter and every peddler who passes in a month, and
she notices the stranger before the stranger notices her. Most trouble is stopped with a
question asked early and politely.""",
    """The temple of the Lantern Mother keeps a lamp burning in its window all night, every
night, for anyone lost on the road. Travelers who follow it are given a bowl of soup and a
place by the fire, and in return they are asked to tell one true story before they sleep. The
priests write the best ones down.""",
    """Salt is money on the coast. A sack of good salt buys a pig in the hills, and a barrel of
salted fish buys a winter's grain. The salt pans of Saltcombe have belonged to the same three
families for a hundred years, and their quarrels over water rights fill more pages in the
court rolls than every theft in the province together.""",
    """Weather lore in Hollowmere: a red sky at dusk means a dry morning; a ring around the moon
means rain within two days; when the cows lie down in the field before noon, bring the washing
in. The miller swears by the cows, and the miller is rarely wrong.""",
    """The mine at Kettle Rock gives copper, a little silver, and a great deal of trouble. The
lower galleries flood every spring and the miners pump them out by hand. There is a tunnel on
the third level that nobody works; the foreman says the air is bad, and the miners say other
things, quietly.""",
    """Traveling bards are welcome in every village and trusted in none. They carry news
faster than any courier, and they change it as they go, so that a wolf seen in Elmstead becomes
a pack of wolves in Mossgate and a dragon by the time the song reaches the coast.""",
    """Bread is baked before dawn. The baker in Stillwater lights her oven at the fourth bell,
when the rest of the village is asleep, and by sunrise the smell of rye and onion reaches the
guards at the gate. The guards buy the first loaves, and in return she gets the news of the
night before anyone else.""",
    """A cartographer's work is never done. Rivers move, forests are cut, villages grow and empty.
The maps sold in Highmarket are mostly copies of copies, and a careful traveler asks locals for
the way and checks the sun. The best map in the province is said to hang in the reeve's house at
Wyndham Ford, and the reeve does not lend it.""",
    """The herbalist keeps three kinds of shelves. The top shelf holds what heals: yarrow for
cuts, willow bark for fever, mint for the stomach. The middle shelf holds what helps sleep and
dulls pain, sold in small amounts and only to people she knows. The bottom shelf is kept
locked, and she will not say what is on it.""",
    """Festival of Lanterns: on the longest night of the year, every household in the Lantern
Coast sets a candle in a paper lantern and floats it on the water. The lanterns carry the
names of those who died that year. Fishermen do not put out to sea the next morning, whatever
the weather.""",
    """Wolves came down from the fells in the hard winter of the cracked bell, and the villages
along the north road lost sheep, dogs and one shepherd. The reeves paid a silver mark for every
wolf pelt, and hunters came from as far as the coast. By spring the wolves were gone, and so
was most of the silver in the valley.""",
    """Trade at the autumn fair in Ashby Cross follows old rules. No sale is made before the
bell. No price is shouted; it is spoken once, quietly, and answered once. A deal is closed with
a handshake over the stall and a cup of cider after, and a merchant who goes back on a
handshake is not welcome at the next fair.""",
    """The river guards of Greywater patrol in flat boats with long poles and short tempers.
They check the cargo of every barge that passes the chain, take the river toll in coin or in
kind, and keep a book of every boat's name. Smugglers who try the river at night usually meet
the chain before they meet the guards.""",
    """Every village has a well, and every well has a story. The well at Mossgate is said to
grant a wish for a silver coin, which is why the bottom is thick with copper and nobody has
ever had a wish granted. The reeve has the well cleaned once a year and the coins pay for the
village feast.""",
    """Quests are rarely grand. Most work a traveler is offered in a village is small and
practical: find the goat that wandered off, carry a letter to the next valley, clear the rats
from the grain store, walk a nervous merchant through the woods. It pays little, but it pays
in food, a bed and the goodwill of people who will remember your name.""",
    """The chapel ruins above Thornwick were burned in the war of the two brothers, and only the
bell tower still stands. On windy nights the tower hums. The villagers say the old bell is
still inside, buried in the rubble, and that whoever digs it out will have good luck for
seven years. Nobody has found it yet.""",
]

# --------------------------------------------------------------------------------------------
# Lore templates, grouped by topic (each paragraph picks sentences from one topic)
# --------------------------------------------------------------------------------------------

LORE = {
    "village": [
        "{village} is a small village in {region}, known for its {good} and its stubborn people.",
        "Most families in {village} have farmed the same fields for {years} years.",
        "The reeve of {village}, {full}, settles quarrels over boundaries and stray {animal}s.",
        "A market is held in the square of {village} every {days} days, weather permitting.",
        "The road from {village} to {village2} runs {miles} miles past {place}.",
        "Travelers who stop in {village} usually eat at {tavern}, since there is nowhere else.",
        "In {season} the people of {village} repair roofs, mend nets and trade {good} for {good2}.",
        "The oldest house in {village} belongs to a {job} named {name}, who will tell you so.",
        "Children in {village} are warned never to play near {place} after dark.",
        "{village} pays its taxes to {city} in {good}, and complains about it every year.",
        "The well in the middle of {village} has never run dry, not even in the drought of {month}.",
        "When {weather} comes to {village}, the shutters close and the tavern fills up.",
        "A stone bridge links {village} to the fields on the far bank, and a toll of {price} was charged there once.",
        "Strangers are welcome in {village} as long as they pay in coin and leave before the festival.",
        "The chapel in {village} is dedicated to {god}, and its bell rings at dawn and dusk.",
        "Half the houses in {village} keep a {animal}, and the other half complain about the noise.",
    ],
    "tavern": [
        "{tavern} stands at the edge of {village}, under a sign that has not been painted in years.",
        "The keeper of {tavern}, {full}, pours {drink} for {price} a mug and listens more than she talks.",
        "Tonight the slate by the door of {tavern} reads: {dish}, {drink}, and a room for {price}.",
        "Locals sit by the fire in {tavern}; travelers get the tables near the draughty door.",
        "A bard named {name} plays at {tavern} on market days, badly but with great energy.",
        "The cellar of {tavern} has been troubled by {threat}, and the keeper wants it dealt with.",
        "Every quarrel in {village} is settled, or started, over a mug of {drink} at {tavern}.",
        "The {dish} at {tavern} is famous across {region}, though nobody agrees on why.",
        "A notice pinned behind the bar of {tavern} offers {price} for news of {item}.",
        "Rooms at {tavern} are small and clean, and the beds are stuffed with fresh straw each {season}.",
        "The keeper's rule at {tavern} is simple: no blades drawn indoors, and no singing after midnight.",
        "A {job} from {village2} has been drinking {drink} at {tavern} for {days} days and paying in {good}.",
        "When it rains, the roof of {tavern} leaks over the third table, so nobody sits there.",
    ],
    "smith": [
        "The forge in {village} belongs to {full}, a {metal}-worker with arms like oak branches.",
        "{name} the blacksmith can mend a {weapon} in an afternoon and a plough in a morning.",
        "A good {metal} {weapon} from the forge in {village} costs {price}, and it is worth it.",
        "The smith buys ore from the mines of {region} and charcoal from {place}.",
        "Sparks fly from the forge from dawn until the evening bell, and the hammer can be heard across {village}.",
        "{name} refuses to forge weapons during {month}, saying the iron is too cold to listen.",
        "Horseshoes are the smith's bread and butter: {n} pairs a day in the busy season.",
        "The guards of {village} bring their {weapon}s to the forge every {season} for sharpening.",
        "An apprentice named {name2} works the bellows and dreams of making a {weapon} of her own.",
        "The smith keeps a barrel of rainwater for quenching and will not let anyone touch it.",
        "A {weapon} hangs above the forge door, the first the smith ever made, bent and proud.",
        "Customers who haggle too hard at the forge find that repairs take twice as long.",
    ],
    "guard": [
        "The gate of {village} is watched by {n} guards by day and half as many by night.",
        "Captain {full} commands the watch of {village} and trusts no one who arrives after dusk.",
        "Guards on the wall of {village} carry a {weapon} and a horn to call for help.",
        "The watch has doubled since {threat} were seen near {place}.",
        "A guard's pay in {village} is {price} a week, bread, and boots every winter.",
        "Anyone entering {village} with a drawn {weapon} is disarmed and questioned.",
        "The night watch walks the wall every hour, calling the time and the weather.",
        "Guard {name} has served the watch for {years} years and knows every face in the market.",
        "Smugglers have been caught twice this {season} trying to carry {good} past the river chain.",
        "The guards keep a ledger of every stranger who enters, with name, trade and business.",
        "Nobody may leave {village} by the north gate after the evening bell without the captain's leave.",
    ],
    "merchant": [
        "{full} trades {good} and {good2} along the road between {village} and {city}.",
        "A merchant's cart from {region} arrives in {village} every {days} days, loaded with {good}.",
        "The price of {good} in {village} has doubled since {weather} ruined the {season} crop.",
        "At the market a sack of {good} sells for {price}, or less if you buy before noon.",
        "Merchants travel in groups through {place}, since {threat} have been seen on the road.",
        "{name} sells {good} from a stall under a striped awning and never gives credit.",
        "The merchants' guild of {city} sets the price of {good} for all of {region}.",
        "A clever trader buys {good} in {village} and sells it in {village2} for twice the price.",
        "The spice merchant {name} claims her pepper comes from beyond the sea; it comes from {village2}.",
        "Every trader in {village} keeps two purses: one for the toll guards, one for everything else.",
        "Wool from {region} is rough but warm, and it sells well in {city} before winter.",
        "A barrel of {drink} travels {miles} miles to reach {village}, and its price grows with every mile.",
    ],
    "quest": [
        "The reeve of {village} offers {price} to anyone who can clear {threat} from {place}.",
        "A notice in {tavern} asks for someone to carry {item} to {village2} before {month}.",
        "{full} has lost {item} near {place} and will pay {price} for its return.",
        "A {animal} belonging to {name} wandered off toward {place} and has not come back.",
        "The miller of {village} needs an escort for a cart of {good} bound for {city}.",
        "Strange lights have been seen at {place}, and the priest wants someone brave to look.",
        "The herbalist needs fresh {good} from the woods beyond {place}, picked before the frost.",
        "A bridge near {village} has collapsed and the carpenters want guards while they rebuild it.",
        "Someone has been stealing {good} from the storehouse of {village}, and the reeve wants the thief found.",
        "An old soldier in {tavern} will teach a traveler to use a {weapon} in exchange for a favor.",
        "The guards of {village} pay {price} for every report of {threat} near the road.",
        "A child from {village} claims to have seen {threat} at {place}; nobody believes her yet.",
    ],
    "weather": [
        "In {region}, {season} brings {weather} and short tempers.",
        "{weather} closed the road to {village} for {days} days last {month}.",
        "Farmers in {village} read the sky each morning and expect {weather} before the week is out.",
        "When {weather} settles over {place}, even the guards stay indoors.",
        "The ferry does not run in {weather}, and travelers wait at {tavern} instead.",
        "Old folk in {village} say a hard {season} follows a wet {month}.",
        "Fishing boats stay in harbor when the wind turns east and {weather} is on its way.",
        "The harvest was saved this year because {weather} held off until the last cart was in.",
        "After {weather}, the roads of {region} turn to mud and the carters charge double.",
    ],
    "history": [
        "{city} was founded {years} generations ago by traders who came up the river in flat boats.",
        "The war of the two brothers left the chapel at {place} in ruins and the fields of {region} empty.",
        "In the year of the cracked bell, {threat} came down from the hills and {village} was nearly abandoned.",
        "The old road through {region} was built by the kings of {city} and has not been repaired since.",
        "Stories say {god} once walked through {village} disguised as a {job} and blessed its well.",
        "The first reeve of {village} was a {job} named {full}, whose name is carved above the chapel door.",
        "A great flood in {month} of an old year swept away half of {village2}; the marks are still on the walls.",
        "The mines of {region} were closed for {years} years after the collapse, and reopened only recently.",
        "Songs about the siege of {village} are still sung at {tavern}, each verse longer than the last.",
        "The standing stones near {place} are older than any village in {region}.",
    ],
    "people": [
        "{full}, the {job} of {village}, is kind to strangers and hard on debtors.",
        "{name} is a {job} who moved to {village} {years} years ago and still counts as new.",
        "The {job} {name} keeps bees behind the house and trades honey for {good}.",
        "Everyone in {village} knows {name}, the {job}, who has an opinion about everything.",
        "{name} and {name2} have been quarreling over a fence for {years} years.",
        "The old {job} {full} remembers when {threat} came to {village} and will tell the tale for a mug of {drink}.",
        "{name} lost a brother to {threat} and has not left {village} since.",
        "The {job} in {village} is teaching {n} apprentices, and none of them listen.",
        "{name} the {job} walks to {place} every morning before dawn, and nobody knows why.",
        "A widow named {name} runs the best {job}'s shop in {region}.",
    ],
}

# --------------------------------------------------------------------------------------------
# Dialogue: lines by role, used to build short scenes
# --------------------------------------------------------------------------------------------

PLAYER_LINES = {
    "greet": [
        "Good day to you.", "Hello there.", "Evening. Is this a good place to rest?",
        "Well met, friend.", "Hail. I have just come down the road from {village2}.",
        "Greetings. Do you have a moment?", "Hello. I am new in {village}.",
    ],
    "ask_work": [
        "Is there any work for a traveler here?", "I could use some coin. Any jobs going?",
        "Does anyone need help around {village}?", "I heard there is trouble at {place}. Is that true?",
        "The notice board mentions {threat}. What do you know about it?",
    ],
    "ask_trade": [
        "What are you selling today?", "How much for the {good}?", "Do you buy {good2}?",
        "I need a new {weapon}. Can you help?", "Can you mend this {weapon}?",
        "That price is too high. Would you take less?",
    ],
    "ask_lore": [
        "Tell me about {village}.", "What is there to see around here?",
        "Who runs this place?", "What happened at {place}?", "Is the road to {village2} safe?",
        "What is the weather going to do?", "Have you heard any news from {city}?",
    ],
    "rude": [
        "Out of my way.", "I do not have time for your stories.", "Hand over {item} or else.",
        "Your prices are robbery.", "I could take what I want, you know.",
    ],
    "farewell": [
        "Thank you. I will be on my way.", "Farewell.", "I will come back later.",
        "Until next time.", "Safe travels to you too.",
    ],
}

NPC_LINES = {
    "innkeeper": {
        "greet": [
            "Welcome to {tavern}. Sit anywhere that is dry.",
            "Come in, come in, shut the door behind you. It is {weather} out there tonight.",
            "Evening, traveler. A bowl of {dish} and a mug of {drink} will set you right.",
            "You look like you walked the whole road from {village2}. Sit down before you fall down.",
        ],
        "ask_work": [
            "The cellar has {threat} again. Clear them out and your room is free for a week.",
            "Ask the reeve. And if you are going near {place}, bring me back a sack of {good}.",
            "There is a merchant upstairs who wants an escort to {village2}. He pays in silver.",
        ],
        "ask_trade": [
            "A room is {price} a night, supper included. {drink} is extra.",
            "I sell food and beds, friend. For {good}, try the market.",
            "The {dish} is fresh today. {price} a bowl, and the bread is free.",
        ],
        "ask_lore": [
            "{village} is quiet, mostly. Farmers, a smith, a reeve who thinks he is a king.",
            "The road to {village2} is fine by day. At night, {threat}. Stay here instead.",
            "News from {city}? Taxes are up and the guild is angry. Same as every {season}.",
            "If you want the weather, ask the miller. He says {weather} is coming, and he is rarely wrong.",
        ],
        "rude": [
            "Mind your tone under my roof, or you can sleep in the stable with the {animal}.",
            "One more word like that and you will be drinking in the rain.",
        ],
        "farewell": [
            "Safe roads. The door is open if you come back.",
            "Mind the step on the way out. It has tripped better folk than you.",
        ],
    },
    "blacksmith": {
        "greet": [
            "Step back from the forge unless you want to lose your eyebrows. What do you need?",
            "Morning. If you have come for horseshoes, there is a queue.",
            "Another traveler with a dull {weapon}, I expect. Let me see it.",
        ],
        "ask_work": [
            "I need {metal} ore from the mine at {place}. The carters refuse to go because of {threat}.",
            "Bring me charcoal from the woods and I will sharpen your {weapon} for nothing.",
            "Work? Pump the bellows for an hour and we will see if you are any use.",
        ],
        "ask_trade": [
            "A {metal} {weapon} is {price}. I do not haggle; the iron does not haggle either.",
            "I can mend that {weapon} by tomorrow. {price2}, paid half now.",
            "Horseshoes are {price} a set. Nails are free if you do not waste my time.",
            "This {weapon} was made by someone who hated iron. I can fix it, but it will cost {price}.",
        ],
        "ask_lore": [
            "The mines of {region} give good ore, if the tunnels do not flood.",
            "The guards bring me their {weapon}s every {season}. Half of them never clean them.",
            "My master used to say iron remembers. I believe him more every year.",
        ],
        "rude": [
            "Say that again while I am holding this hammer.",
            "You can take your business to {village2}. It is only {miles} miles.",
        ],
        "farewell": [
            "Come back when that {weapon} needs work. It will.",
            "Mind the sparks.",
        ],
    },
    "guard": {
        "greet": [
            "Halt. State your name and your business in {village}.",
            "Evening. Keep your {weapon} sheathed inside the walls and we will get along.",
            "Another traveler. Where have you come from, and what are you carrying?",
        ],
        "ask_work": [
            "The captain pays {price} for every report of {threat} near the road.",
            "If you can swing a {weapon}, talk to Captain {name}. We are short of hands at {place}.",
            "There is a reward for the smugglers who run {good} past the river chain.",
        ],
        "ask_trade": [
            "I am a guard, not a shopkeeper. The market is past the well.",
            "The smith sells {weapon}s. Tell her the watch sent you and she may knock off a penny.",
        ],
        "ask_lore": [
            "The road to {village2} is safe by day. After dusk, we do not go past {place}.",
            "Three nights ago we saw {threat} near {place}. Since then the watch has doubled.",
            "The gate closes at the evening bell. If you are outside, you sleep outside.",
        ],
        "rude": [
            "Keep talking like that and you will spend the night in the cells.",
            "Hands where I can see them. Now.",
        ],
        "farewell": [
            "Move along, then. And stay out of trouble.",
            "Safe roads. Be inside the walls by dark.",
        ],
    },
    "merchant": {
        "greet": [
            "Welcome, welcome! The finest {good} in {region}, and the fairest prices.",
            "Ah, a customer with taste. Look, but do not squeeze the {good}.",
            "Good day! Fresh from {city}: {good}, {good2} and a little gossip, free of charge.",
        ],
        "ask_work": [
            "I need an escort to {village2}. Three days, {price}, and you eat what I eat.",
            "Someone has been stealing {good} from my cart at night. Find them and I will pay {price}.",
        ],
        "ask_trade": [
            "For you, the {good} is {price}. For anyone else it is more, believe me.",
            "I buy {good2} at {price} a sack, if it is dry and clean.",
            "{price}? You wound me. Say {price2} and we will shake on it.",
            "A fine {weapon}, hardly used. {price}, and I will throw in a whetstone.",
        ],
        "ask_lore": [
            "The roads are bad this {season}. {weather}, {threat}, and the tolls have gone up again.",
            "In {city} the guild sets every price. Out here, I set them, and I am much kinder.",
            "{village2} has the best {good} in the province, but do not tell them I said so.",
        ],
        "rude": [
            "No need for that. A sale is a conversation, not a robbery.",
            "The guards are right over there, friend. Shall I call them?",
        ],
        "farewell": [
            "Come back soon! New stock arrives in {days} days.",
            "Tell your friends about the honest merchant by the well.",
        ],
    },
    "herbalist": {
        "greet": [
            "Careful where you step; the mint gets everywhere. How can I help?",
            "You look pale. Sit down and tell me what hurts.",
        ],
        "ask_work": [
            "I need moonwort from the banks near {place}, picked at dusk. I will pay {price}.",
            "Bring me a basket of {good} before the frost and I will make you a salve for free.",
        ],
        "ask_trade": [
            "Willow bark for fever, yarrow for cuts. {price} a bundle.",
            "This ointment will close a cut in a day. {price}, and do not eat it.",
        ],
        "ask_lore": [
            "The marsh near {village2} grows herbs you will not find anywhere else, and fevers too.",
            "My grandmother taught me every plant in {region}. Some of them she told me never to touch.",
        ],
        "rude": [
            "I know which plants make a man sleep for a week. Be polite.",
        ],
        "farewell": [
            "Drink plenty of water, and stay indoors if {weather} comes.",
            "Go gently.",
        ],
    },
    "farmer": {
        "greet": [
            "Afternoon. Mind the {animal}; she bites.",
            "Hello, stranger. Not many come out this far from {village}.",
        ],
        "ask_work": [
            "My {animal} has gone off toward {place} again. Bring her back and supper is yours.",
            "Something is eating the {good} in my store. I think it is {threat}, but my wife says rats.",
        ],
        "ask_trade": [
            "I can spare a sack of {good} for {price}.",
            "Eggs, cheese and {good}. Pay what you think is fair, but think carefully.",
        ],
        "ask_lore": [
            "The {season} has been hard. {weather} every week and the crop half what it should be.",
            "My family has farmed this field for {years} years. The stones near {place} were here before us.",
        ],
        "rude": [
            "Get off my land before I set the dog on you.",
        ],
        "farewell": [
            "Close the gate on your way out.",
            "Good luck to you. Watch the sky; {weather} is on its way.",
        ],
    },
    "priest": {
        "greet": [
            "Peace on your road, traveler. The lamp of {god} burns for everyone.",
            "Welcome to the chapel. Take off your hat, and mind the loose flagstone.",
            "You are up early. Have you come to pray, or to ask for something?",
        ],
        "ask_work": [
            "The graveyard wall has fallen near {place}. Strong hands are always a blessing.",
            "Someone has stolen the offering box. I would rather have it back than see anyone hanged.",
            "Carry these candles to the shrine at {place}. The road is long, but the reward is not only coin.",
        ],
        "ask_trade": [
            "The chapel sells nothing. But a gift of {good} for the poor would be remembered.",
            "Blessed water is free. Blessed charms are {price}, for the roof fund.",
        ],
        "ask_lore": [
            "{god} was honored here long before {village} had a name.",
            "Every true story told at this hearth is written down. We have {n} books of them now.",
            "The bell tower was rebuilt after the war of the two brothers. The old bell was never found.",
        ],
        "rude": [
            "Anger is a heavy pack to carry. Put it down before you cross my threshold.",
            "I will pray for you. Loudly, and in front of everyone.",
        ],
        "farewell": [
            "Go with light. And come back for the harvest supper.",
            "May your boots stay dry and your purse stay full.",
        ],
    },
    "ferryman": {
        "greet": [
            "Crossing? Two pennies for walkers, five for riders. The mule does not negotiate.",
            "Wait for the raft to stop moving before you step on. Last week someone did not.",
        ],
        "ask_work": [
            "The rope is fraying near the far post. Bring me a new coil from {village2} and you cross free all {season}.",
            "Something big has been bumping the raft at night. I think it is {threat}. I would pay to know.",
        ],
        "ask_trade": [
            "A cart costs a silver mark. Animals are extra, unless they swim.",
            "I will take {good} instead of coin, if it is good {good}.",
        ],
        "ask_lore": [
            "The river is high in {season}. When it turns brown, I do not cross, not for a king.",
            "My father ran this ferry, and his mother before him. The river has tried to take all three of us.",
        ],
        "rude": [
            "Speak to me like that and you can swim across.",
        ],
        "farewell": [
            "Mind your footing on the far bank; it is all mud.",
            "Safe crossing. Tip the mule if you can; she likes apples.",
        ],
    },
    "bard": {
        "greet": [
            "A new face! Sit, sit. Do you prefer songs of love, of war, or of cheese?",
            "Hail, stranger. Tell me where you are from and I will have a verse about it by supper.",
        ],
        "ask_work": [
            "I need someone to fetch my lute from {tavern} in {village2}. I left it as payment. Long story.",
            "Find me a true tale about {threat} and I will share the coin from the song.",
        ],
        "ask_trade": [
            "A song costs {price}. A song about you costs twice that, and is much more flattering.",
            "I sell ballads, broadsheets and rumors. The rumors are cheapest and most popular.",
        ],
        "ask_lore": [
            "They say a wyvern nests above {place}. They also say I am the finest singer in {region}.",
            "Every village has a song about its founding. Most of them are lies, and all of them rhyme.",
        ],
        "rude": [
            "Careful. I write satires, and they travel faster than you do.",
        ],
        "farewell": [
            "Go well! If you die heroically, I want to hear about it first.",
            "Farewell, friend. Your name will be in a verse by morning.",
        ],
    },
    "hunter": {
        "greet": [
            "Quiet. You will scare off every deer from here to {place}.",
            "Stranger. You walk loud, but you walk careful. That is something.",
        ],
        "ask_work": [
            "Tracks near {place}. Big ones. I think {threat}. Come with me and bring a {weapon}.",
            "The reeve pays for wolf pelts this {season}. I could use a second pair of eyes.",
        ],
        "ask_trade": [
            "Pelts, dried venison and arrows. A bundle of arrows is {price}.",
            "I trade meat for {good}. Coin is no use in the forest.",
        ],
        "ask_lore": [
            "The woods past {place} are older than the village. Some trails there were not made by animals.",
            "A hard winter is coming. The squirrels know it, and so do I.",
        ],
        "rude": [
            "I have put arrows in smaller animals than you.",
        ],
        "farewell": [
            "Walk soft. The forest listens.",
            "Keep to the path after dark.",
        ],
    },
}

ROLE_NAMES = {
    "innkeeper": "Innkeeper", "blacksmith": "Smith", "guard": "Guard", "merchant": "Merchant",
    "herbalist": "Herbalist", "farmer": "Farmer", "priest": "Priest", "ferryman": "Ferryman",
    "bard": "Bard", "hunter": "Hunter",
}

ROLE_EMOTION = {
    "greet": ["happy", "neutral", "curious"],
    "ask_work": ["neutral", "curious", "grateful"],
    "ask_trade": ["neutral", "happy", "suspicious"],
    "ask_lore": ["neutral", "curious", "sad"],
    "rude": ["angry", "suspicious", "afraid"],
    "farewell": ["happy", "neutral", "grateful"],
}
ROLE_ACTION = {
    "greet": ["none", "none", "serve_drink"],
    "ask_work": ["give_quest", "give_quest", "point_direction"],
    "ask_trade": ["open_shop", "open_shop", "repair_item"],
    "ask_lore": ["none", "point_direction"],
    "rude": ["refuse", "close_door", "attack", "flee"],
    "farewell": ["none"],
}

PERSONA_TRAITS = [
    "gruff but fair", "cheerful and talkative", "suspicious of strangers", "tired and short of patience",
    "proud of the village", "curious about the world", "kind to children and animals",
    "greedy but honest", "superstitious", "quietly brave",
]

NARRATION = [
    "The fire crackles.", "Rain drums on the shutters.", "A dog barks somewhere outside.",
    "The {animal} watches from the doorway.", "Someone laughs at the back of the room.",
    "The hammer falls again.", "A cart rattles past on the cobbles.", "The evening bell rings.",
    "Wind whistles through the gaps in the wall.", "The smell of {dish} drifts from the kitchen.",
]


# --------------------------------------------------------------------------------------------
# Reference material: bestiary, herbal, crafts, recipes, proverbs (handwritten, used as they are)
# --------------------------------------------------------------------------------------------

BESTIARY = [
    ("Fen wolf", "A lean grey wolf of the marshes, longer in the leg than its cousins of the fells. Fen wolves hunt in pairs, never in packs, and they will follow a traveler for hours without showing themselves. Shepherds hang tin bells on their fences; the clatter confuses them."),
    ("River troll", "Broad, slow and patient, a river troll lives under bridges and fords and eats whatever falls in. It cannot abide smoke. Ferrymen keep a smudge pot burning on the raft, and the wiser ones pay the troll a fish a week to keep the peace."),
    ("Marsh light", "A pale, flickering glow over standing water. Scholars argue whether it is a creature, a gas or a trick of the eye. Whatever it is, it leads walkers off the causeway and into the bog. Never follow one, and never answer if it seems to call your name."),
    ("Cellar rat", "An ordinary rat grown fat on grain and spilled ale. Harmless one at a time; ruinous by the hundred. A good terrier is worth more than a sword against them, and a tavern cat is worth more than both."),
    ("Young wyvern", "A winged reptile the size of a pony, with a barbed tail and a temper. Wyverns nest on cliffs and raid sheep in late summer, when the young are learning to hunt. Their venom causes fever and shaking; the herbalists treat it with feverfew and a great deal of sleep."),
    ("Goblin", "Small, clever, quarrelsome folk of the hill caves, who steal tools, chickens and laundry. They trade, too, when they think nobody is watching: a goblin will leave a polished stone on a doorstep in exchange for a loaf of bread."),
    ("Barrow wight", "A restless shape said to guard the old burial mounds. It is cold to be near and its touch numbs the limbs. Salt across the threshold, iron nails in the doorframe and a candle that burns until dawn are the traditional defenses."),
    ("Wild boar", "Bristled, tusked and faster than it looks. A cornered boar will charge a mounted hunter and win. Hunters use a spear with a crossbar so that the animal cannot run up the shaft."),
    ("Cave bear", "Huge and usually drowsy, a cave bear wakes hungry in Thawmonth and raids beehives, orchards and larders. Shouting and banging pots will drive it off; running will not."),
    ("Ash crow", "A large black bird with grey wings, common around battlefields and gallows. Ash crows are clever enough to untie knots and steal from open purses. Some people in the marches keep them as messengers."),
    ("Salt eel", "A thick, slimy eel of the tidal flats, delicious smoked and dangerous alive: its bite holds like a vice. Saltcombe fishermen wear leather gloves up to the elbow when they empty the eel traps."),
    ("Moor hound", "A shaggy black dog with eyes that catch the lantern light. Some are only strays. Others are said to appear before a death in the family, sitting silently at the end of the lane."),
    ("Stone beetle", "A beetle as large as a hand, with a shell hard enough to turn a knife. They burrow in old walls and mine timbers, weakening them. Miners listen for their clicking and shore up any tunnel where it is heard."),
    ("Highway robber", "Not a beast, though the guards would argue. Robbers on the north road work in small bands, block the way with a felled tree and demand a toll. Most will take the purse and leave the traveler; a few will not."),
    ("Hill giant", "Rare, solitary, and more curious than cruel. A hill giant may sit on a ridge for a whole afternoon watching a village go about its business. They have been known to carry lost sheep home, and to eat them on the way."),
]

HERBAL = [
    ("Yarrow", "feathery leaves and flat white flowers; pressed onto a cut, it slows bleeding. Grows along paths and field edges."),
    ("Willow bark", "stripped from young branches in spring and boiled; the bitter tea eases fever and aching joints."),
    ("Feverfew", "small daisy-like flowers with a sharp smell; chewed for headaches and given after wyvern stings."),
    ("Moonwort", "a rare fern of damp banks, picked at dusk; apothecaries pay well for it, and nobody agrees on what it does."),
    ("Comfrey", "broad hairy leaves; a poultice of it helps bruises and sprains knit. Called knitbone by the old women of the vale."),
    ("Mint", "spreads everywhere it is allowed; settles the stomach and freshens breath and stale rooms."),
    ("Nettle", "stings the hand that picks it carelessly; boiled young, it makes a green soup that carries poor families through spring."),
    ("Valerian", "its root smells like old boots; a small dose brings sleep, a large one brings strange dreams."),
    ("Thyme", "grows on dry stony slopes; flavors mutton and is burned in sickrooms to sweeten the air."),
    ("Elderflower", "creamy blossoms in early summer; made into cordial for children and wine for everyone else."),
    ("Foxglove", "tall purple bells; the herbalist keeps it on the bottom shelf, for it heals the heart in small measures and stops it in large ones."),
    ("Marigold", "bright orange flowers; the petals go into salves for chapped hands and the cheese makers use them for color."),
    ("Hawthorn", "berries for the heart, blossom for weddings, and branches for hedges that no cow can push through."),
    ("Bog myrtle", "a fragrant shrub of wet moorland; rubbed on the skin, it keeps the midges away."),
    ("Sage", "grey leaves with a warm smell; gargled for sore throats and hung over doors against ill luck."),
]

CRAFTS = [
    "A cooper shapes oak staves over a small fire until they bend, then binds them with iron hoops. A good barrel holds ale for a year without a drop lost; a poor one weeps at every seam.",
    "The tanner's yard is always at the far end of the village, downwind, because curing hides takes bark, lime, patience and a smell that never quite washes out.",
    "Charcoal burners live in the woods for weeks, stacking wood into domes, covering them with turf and tending the slow smoulder day and night. The smiths cannot work without them, and the village rarely thanks them.",
    "A thatcher lays bundles of reed or straw in overlapping courses and pins them with hazel spars. A well-thatched roof keeps out rain for thirty years and shelters more mice than any barn.",
    "The miller sets his stones a hair's breadth apart. Too close and the flour burns; too far and the grain passes through cracked but whole. He listens to the rumble of the wheel and adjusts by ear.",
    "Weavers in the vale work at upright looms in the front room, where the light is best. Each family has its own pattern of checks, and a cloak can tell you which village its owner comes from.",
    "Rope walkers twist hemp fibres along a path as long as a field. The ferrymen, fishermen and miners buy nearly all of it, and they test every coil by hanging a sack of stones from it before they pay.",
    "Candle making is done in autumn, after the pigs are slaughtered. Tallow candles are cheap, smoky and smell of supper; beeswax candles burn clean and bright and are kept for the chapel and the rich.",
    "A wheelwright must be carpenter, smith and geometer at once: the spokes of ash, the rim of elm, the iron tyre fitted hot so that it shrinks tight as it cools with a hiss of steam.",
    "Salt panning on the coast is summer work. Sea water is let into shallow clay beds, the sun and wind do the rest, and the salt is raked into white heaps that shine like snow under a hot sky.",
    "Beekeepers in the Copper Hills keep their hives in hollow logs and speak to the bees about every birth, marriage and death in the family. A hive that is not told, they say, will fly away.",
    "A cartographer walks the roads with a measuring wheel, a compass and a notebook, counting paces and sketching every fork and landmark. Back at the desk the notes become a map, which the next flood makes wrong.",
]

RECIPES = [
    "Mutton stew, as served at the Drowsy Badger: brown the mutton in fat, add onions, turnips and barley, cover with water and a mug of dark beer, and leave it at the back of the hearth from noon until supper. Thyme at the end. Serve with bread hard enough to need the stew.",
    "Eel pie, Saltcombe style: skin and cut the eels, layer them with parsley, onion and a little vinegar, cover with a lard crust, and bake until the kitchen smells like the harbor on a good day.",
    "Apple cake for the autumn fair: butter, honey, flour, three eggs and as many sliced apples as will fit. Bake in the bread oven after the loaves are out, while it is still warm. The cake is done when the children start to gather at the door.",
    "Barley tea for travelers: roast a handful of barley in a dry pan until brown, boil it with water, strain it. It is not much of a drink, but it is warm, cheap and never makes anyone sing.",
    "Mushroom porridge from the charcoal woods: oats, water, a knob of butter and whatever mushrooms the burner knows to be safe. Ask which ones before eating it. Ask twice.",
    "Honey mead: one part honey to four parts water, boiled, cooled, and left in a barrel with a cloth over it until it stops bubbling. Some brewers add hops, some add herbs, and all of them claim their grandmother's method is the only true one.",
    "Cheese dumplings for a cold night: soft cheese, flour, an egg and salt, rolled into balls and dropped into boiling broth. They are ready when they float. Eat them before they sink again.",
    "Onion bread: rye flour, a handful of fried onion, salt, and sourdough saved from yesterday's batch. The crust should crack when you press it and the crumb should smell sweet.",
]

PROVERBS = [
    "A full barn makes a quiet village.",
    "Trust the miller about weather and the smith about iron, and nobody about horses.",
    "The ford is shallow until you are halfway across.",
    "Salt keeps fish and secrets, but not for ever.",
    "A guard who knows your name is worth ten who know your face.",
    "Borrow a cart, return a cart and a sack of apples.",
    "Ask the road, not the map.",
    "A cold forge feeds no family.",
    "Rain before the fair, coin after.",
    "Every tavern has one chair nobody sits in; ask why before you do.",
    "Bread today, stories tomorrow.",
    "The mule crosses when the mule decides.",
    "A merchant's smile is free, and so is the second price he names.",
    "Never buy a sword on a feast day or a horse at dusk.",
    "When the crows go quiet, go home.",
    "The well remembers every coin and grants no wishes.",
    "A quiet guest is either tired or hiding something.",
    "Fog in the morning, fish in the afternoon.",
    "Mend the roof in summer and the quarrel before winter.",
    "The herbalist's cure is bitter; the bard's is worse.",
    "Walk with a lantern even when the moon is full.",
    "A village without a smith is a village without nails, and soon without roofs.",
    "Three things travel faster than a horse: rumors, fire and debts.",
    "Nobody counts the sheep until the wolf has been.",
]

NOTICES = [
    "NOTICE. The reeve of {village} offers {price} for the capture of whoever has been taking {good} from the common store. Speak to {full} at the toll house.",
    "WANTED: a strong and honest traveler to escort a cart of {good} from {village} to {city}. Pay {price} and meals. Ask for {name} at {tavern}.",
    "LOST near {place}: {item}, of great value to the family. Reward of {price} for its return, no questions asked.",
    "BEWARE. {threat_cap} have been sighted between {village} and {place}. Travelers are advised to go in company and be inside the walls by the evening bell. By order of Captain {full}.",
    "FOR SALE at the forge: {metal} {weapon}s, horseshoes, hinges and nails. Repairs while you wait. Fair prices, no haggling.",
    "The ferry at {village} will not run until the river falls. Travelers for {village2} must take the bridge road, {miles} miles north.",
    "HARVEST SUPPER at the chapel of {god} on the last day of {month}. Bring a dish, a lantern and a song.",
    "HELP WANTED at {tavern}: someone to wash mugs, carry kegs and stay awake during the bard's performance. Room and board.",
    "The market in {village} will be held in the barn this week because of {weather}. Stall fees as usual: {price}.",
    "REWARD of {price} for information about the lights seen at {place}. Speak to the priest, who promises to keep your name to herself.",
]

LETTERS = [
    "Dear {name2},\nThe harvest is in, though {weather} nearly took the last field. The smith asks after you, and so does your mother, who says you never write. Prices for {good} are up again. Come home for the supper in {month} if the roads allow.\nYour cousin, {name}",
    "To the reeve of {village2},\nWe have had trouble with {threat} near {place} and have lost {n} sheep. If your hunters are free this {season}, we will pay {price} and feed them well. Please answer by the carrier.\n{full}, reeve of {village}",
    "{name},\nI reached {city} safely. The guild has set the price of {good} at {price} a sack, which is robbery, but everyone pays it. I will bring back {item} as promised. Do not let the {animal} into the kitchen.\n{name2}",
    "Honored captain,\nThe night watch reports that someone crossed the river chain at the third bell carrying {good}. We gave chase as far as {place} and lost them in {weather}. We request two more lanterns and a dog.\nGuard {name}",
]

EXTRA_PLAYER_LINES = {
    "ask_work": [
        "Where can I find someone who needs a sword arm?", "Have you seen anything strange near {place}?",
        "Who posted the notice about {item}?", "What would you pay for help with {threat}?",
    ],
    "ask_trade": [
        "Do you have any {good} left?", "What would you give me for this {item}?",
        "Is that {weapon} for sale?", "Could you make me something out of {metal}?",
    ],
    "ask_lore": [
        "Why is everyone so nervous tonight?", "Who was here before the village was built?",
        "Which way is {village2}?", "What do you think of the reeve?", "Is it true about {place}?",
        "What is the best thing to eat around here?",
    ],
    "greet": ["Hey. Got a minute?", "Good morning! Lovely weather, isn't it?", "Is this seat taken?"],
}
for _k, _v in EXTRA_PLAYER_LINES.items():
    PLAYER_LINES[_k].extend(_v)

# --------------------------------------------------------------------------------------------
# Document builders
# --------------------------------------------------------------------------------------------


def lore_document(w: World) -> str:
    topic = w.pick(sorted(LORE))
    pool = LORE[topic]
    k = w.number(3, 6)
    idx = w.r.sample(range(len(pool)), k)
    shared = {"village": w.pick(VILLAGES), "tavern": w.pick(TAVERNS), "name": w.name(),
              "full": w.full_name(), "region": w.pick(REGIONS)}
    sentences = [w.fill(pool[i], shared) for i in idx]
    text = " ".join(_title(s) for s in sentences)
    if w.r.random() < 0.3:
        header = w.fill("{village}, {season}.", shared)
        text = header + " " + text
    return text


def scene_document(w: World) -> str:
    role = w.pick(sorted(NPC_LINES))
    lines = NPC_LINES[role]
    shared = {"village": w.pick(VILLAGES), "tavern": w.pick(TAVERNS), "name": w.name(),
              "region": w.pick(REGIONS)}
    npc = w.name()
    who = f"{npc} the {role}" if w.r.random() < 0.5 else ROLE_NAMES[role]
    turns = ["greet"] + w.r.sample(["ask_work", "ask_trade", "ask_lore", "rude"], w.number(1, 3)) + ["farewell"]
    out = []
    if w.r.random() < 0.5:
        out.append(w.fill("[{tavern}, {village}. Outside, {weather}.]" if role == "innkeeper"
                          else "[{village}. A {season} afternoon.]", shared))
    for t in turns:
        out.append("Traveler: " + w.fill(w.pick(PLAYER_LINES[t]), shared))
        out.append(f"{who}: " + w.fill(w.pick(lines[t]), shared))
        if w.r.random() < 0.15:
            out.append(w.fill(w.pick(NARRATION), shared))
    return "\n".join(out)


def npc_response(w: World, role: str, turn: str, shared: dict[str, str]) -> dict:
    resp = {
        "dialogue": w.fill(w.pick(NPC_LINES[role][turn]), shared),
        "emotion": w.pick(ROLE_EMOTION[turn]),
        "action": w.pick(ROLE_ACTION[turn]),
    }
    if resp["action"] == "open_shop" and w.r.random() < 0.6:
        resp["offer"] = {"item": w.pick(GOODS + WEAPONS), "price": w.price()}
    if resp["action"] == "give_quest":
        resp["quest"] = {"title": w.fill(w.pick(QUEST_TITLES), shared), "reward": w.price()}
    if w.r.random() < 0.25:
        resp["mood_change"] = w.pick(["-2", "-1", "0", "+1", "+2"])
    return resp


QUEST_TITLES = [
    "Rats in the cellar", "The lost {animal}", "A letter for {village2}", "Trouble at {place}",
    "Escort to {city}", "Herbs before the frost", "The stolen {good}", "Lights at {place}",
    "Ore for the forge", "The missing ledger",
]


def response_log_document(w: World) -> str:
    role = w.pick(sorted(NPC_LINES))
    shared = {"village": w.pick(VILLAGES), "tavern": w.pick(TAVERNS), "name": w.name(),
              "region": w.pick(REGIONS)}
    out = [w.fill("# npc responses: {name} the " + role + ", {village}", shared)]
    for _ in range(w.number(2, 5)):
        turn = w.pick(sorted(ROLE_EMOTION))
        out.append(json.dumps(npc_response(w, role, turn, shared), ensure_ascii=False))
    return "\n".join(out)


def chat_document(w: World) -> str:
    role = w.pick(sorted(NPC_LINES))
    shared = {"village": w.pick(VILLAGES), "tavern": w.pick(TAVERNS), "name": w.name(),
              "region": w.pick(REGIONS)}
    npc = w.full_name()
    trait = w.pick(PERSONA_TRAITS)
    system = (
        f"You are {npc}, the {role} of {shared['village']} in {shared['region']}. You are {trait}. "
        "Stay in character. Answer with one JSON object with the keys dialogue, emotion and action."
    )
    out = ["system: " + system]
    turns = ["greet"] + w.r.sample(["ask_work", "ask_trade", "ask_lore", "rude"], w.number(0, 2))
    if w.r.random() < 0.5:
        turns.append("farewell")
    knowledge_at = w.number(1, len(turns)) if w.r.random() < 0.3 else -1
    for i, t in enumerate(turns):
        if i == knowledge_at:
            question, resp = knowledge_turn(w, role, shared)
            out.append("user: " + question)
            out.append("assistant: " + json.dumps(resp, ensure_ascii=False))
        out.append("user: " + w.fill(w.pick(PLAYER_LINES[t]), shared))
        out.append("assistant: " + json.dumps(npc_response(w, role, t, shared), ensure_ascii=False))
    return "\n".join(out)


def reference_documents(w: World) -> list[str]:
    """Every bestiary entry, craft and recipe once, plus herbal pages, sayings, notices and letters."""
    docs = [f"Bestiary of {w.pick(REGIONS)}. {name}: {text}" for name, text in BESTIARY]
    docs += CRAFTS + RECIPES
    for _ in range(12):
        plants = w.r.sample(HERBAL, w.number(3, 5))
        head = w.fill("From the herbal kept by {full}, {job} of {village}:")
        docs.append("\n".join([head] + [f"{n}: {d}" for n, d in plants]))
    for _ in range(10):
        sayings = w.r.sample(PROVERBS, w.number(4, 6))
        docs.append("\n".join([w.fill("Sayings heard in {region}:")] + [f"- {x}" for x in sayings]))
    for _ in range(50):
        docs.append(w.fill(w.pick(NOTICES)))
    for _ in range(20):
        docs.append(w.fill(w.pick(LETTERS)))
    return docs


def knowledge_turn(w: World, role: str, shared: dict[str, str]) -> tuple[str, dict]:
    """A player question about a creature or a plant, and the NPC's answer in JSON."""
    if role in ("herbalist", "farmer", "priest"):
        name, text = w.pick(HERBAL)
        question = w.pick(["What is {x} good for?", "Do you know anything about {x}?", "Where does {x} grow?"])
        answer = _title(text.split("; ")[0].rstrip(".")) + "."
        if "; " in text and w.r.random() < 0.7:
            answer = _title(text) if text.endswith(".") else _title(text) + "."
        emotion = w.pick(["neutral", "curious", "happy"])
    else:
        name, text = w.pick(BESTIARY)
        question = w.pick(["What do you know about the {x}?", "Have you ever seen a {x}?", "Is the {x} dangerous?"])
        sentences = text.split(". ")
        answer = ". ".join(sentences[: w.number(1, min(3, len(sentences)))]).rstrip(".") + "."
        emotion = w.pick(["neutral", "afraid", "curious", "suspicious"])
    resp = {"dialogue": answer, "emotion": emotion, "action": w.pick(["none", "none", "point_direction"])}
    return question.format(x=name.lower()), resp


def _collect(make, w: World, target_bytes: int) -> list[str]:
    docs: list[str] = []
    seen: set[str] = set()
    size = 0
    tries = 0
    while size < target_bytes and tries < target_bytes:
        tries += 1
        d = make(w)
        if d in seen:
            continue
        seen.add(d)
        docs.append(d)
        size += len(d.encode("utf-8")) + 2
    return docs


def generate(seed: int = SEED) -> dict[str, str]:
    """Return ``{filename: text}``; the same seed gives the same bytes."""
    w = World(random.Random(seed))
    passages = [" ".join(p.split()) for p in PASSAGES]
    reference = reference_documents(w)
    lore = passages + reference + _collect(lore_document, w, 80_000)
    dialogue = _collect(scene_document, w, 65_000) + _collect(response_log_document, w, 35_000)
    w.r.shuffle(dialogue)
    chat = _collect(chat_document, w, 90_000)
    return {
        "lore.txt": "\n\n".join(lore) + "\n",
        "dialogue.txt": "\n\n".join(dialogue) + "\n",
        "chat.txt": "\n\n".join(chat) + "\n",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--out", type=Path, default=HERE)
    p.add_argument("--check", action="store_true", help="exit 1 if the files differ from what would be written")
    args = p.parse_args(argv)
    files = generate(args.seed)
    stale = []
    for name, text in files.items():
        path = args.out / name
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"{path}: {len(text.encode('utf-8'))} bytes")
    if stale:
        print("stale: " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
