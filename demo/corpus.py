"""The demo's built-in training text (written for this demo): a few paragraphs, tokenized by the model's tokenizer."""

TEXT = """\
The lighthouse at the end of the northern breakwater was built in 1874 from granite quarried two valleys inland.
Its keeper kept a log of every ship that passed, the state of the sea, and the hours the lamp burned. On calm
nights the entries are short: wind light from the west, sea smooth, lamp lit at dusk and put out at dawn. On
stormy nights they run to a page, written in a hand that grows less steady as the hours go by.

The lamp itself burned paraffin until 1921, when an electric light and a clockwork rotating lens replaced it.
The lens, nearly two metres tall, floated on a bath of mercury so that a small weight could turn it. Each
evening the keeper wound the clockwork, trimmed the reserve lamp, and climbed the one hundred and twelve steps
to check that the glass was clean. Salt spray dulled it within a day, so cleaning the glass was the first task
of every morning as well.

Keepers worked in pairs, one on watch while the other slept, and a relief boat brought food, fuel and letters
every second week when the weather allowed. In the winter of 1903 the boat could not land for forty days. The
log records that the keepers rationed the flour, caught fish from the rocks, and kept the light burning every
night. When the boat finally came, the first thing they asked for was news, and the second was tobacco.

The light was automated in 1986. Today a small solar panel charges the batteries that feed a lamp no larger
than a fist, and a sensor switches it on when the evening light fades. The keepers' cottage has become a small
museum, where visitors can read the old logs, climb the stairs, and look out over the water that the keepers
watched for more than a century. On clear days the hills on the far shore are visible, and on most evenings
the fishing boats still come home past the breakwater as the light begins to turn.
"""
