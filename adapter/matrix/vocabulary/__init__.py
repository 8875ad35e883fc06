"""The bottom layer: the bot's own Matrix vocabulary, spelled once and imported by all: the
``io.lambda.*`` keys and the content of its messages (``content``), and its marker state
events (``markers``)."""
