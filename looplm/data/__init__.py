"""The tasks: character-level tiny-shakespeare and multi-digit addition."""
from looplm.data.addition import AdditionTask
from looplm.data.shakespeare import CharTokenizer, ShakespeareTask, get_batch, prepare

__all__ = ["AdditionTask", "CharTokenizer", "ShakespeareTask", "get_batch", "prepare"]
