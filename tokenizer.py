"""Tokenizer (HF `tokenizers`, from tokenizer.json) and chat template (jinja2, as HF renders it)."""
from datetime import datetime
from pathlib import Path

from config import check_fields, read_json_object


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        from tokenizers import Tokenizer as HFTokenizer
        model_dir = Path(model_dir)
        if not (model_dir / "tokenizer.json").exists():
            raise FileNotFoundError(f"{model_dir} has no tokenizer.json (only fast-tokenizer checkpoints are supported)")
        self.tok = HFTokenizer.from_file(str(model_dir / "tokenizer.json"))
        cfg_path = model_dir / "tokenizer_config.json"
        cfg = read_json_object(cfg_path) if cfg_path.exists() else {}
        self.chat_template = cfg.get("chat_template")
        if not (self.chat_template is None or isinstance(self.chat_template, str) or isinstance(self.chat_template, list)
                and all(isinstance(t, dict) and isinstance(t.get("template"), str) for t in self.chat_template)):
            raise ValueError(f"{cfg_path}: chat_template must be a template (a string) or a list of named ones")
        if isinstance(self.chat_template, list):  # some repos ship several named templates
            self.chat_template = next((t["template"] for t in self.chat_template if t.get("name") == "default"), None)
        self.bos_text, self.eos_text = _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token"))
        # every id that ends a turn: config.json, generation_config.json and the eos token itself
        eos = set()
        for name in ("config.json", "generation_config.json"):
            p = model_dir / name
            if p.exists():
                c = read_json_object(p)
                check_fields(c, p, ids=("eos_token_id",))
                e = c.get("eos_token_id")
                eos |= {e} if isinstance(e, int) else set(e or [])
        if self.eos_text is not None and self.tok.token_to_id(self.eos_text) is not None:
            eos.add(self.tok.token_to_id(self.eos_text))
        self.eos_ids = sorted(eos)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True, special_text: bool = True) -> list[int]:
        """special_text: special-token text (e.g. '<|im_start|>') maps to its id, else it is plain text;
        add_special_tokens adds BOS if the model wants it."""
        self.tok.encode_special_tokens = not special_text
        try:
            return self.tok.encode(text, add_special_tokens=add_special_tokens).ids
        finally:
            self.tok.encode_special_tokens = False

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict]) -> str:
        """Render messages [{role, content}] with the model's template, ending with the assistant's turn."""
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        if not self.chat_template:
            raise ValueError("this model has no chat template; use --no-chat")

        def raise_exception(msg):
            raise jinja2.TemplateError(msg)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=True, bos_token=self.bos_text or "", eos_token=self.eos_text or "")
        except jinja2.TemplateError as e:  # the template's own raise_exception, a syntax error, an undefined name
            raise ValueError(f"the model's chat template fails ({type(e).__name__}: {e}); pass --no-chat to send "
                             f"the text as it is") from None

    def chat_markup(self, messages: list[dict]) -> list[list[int]]:
        """The ids of the chat template's own markup around each message's text: before the first, between each
        two, after the last (len(messages) + 1 lists); the template writes BOS itself when the model wants one."""
        marks = [f"\ue000{i}\ue001" for i in range(len(messages))]  # private-use marks where each text goes
        rest = self.render_chat([{**m, "content": mark} for m, mark in zip(messages, marks)])
        pieces = []
        for mark in marks:
            if rest.count(mark) != 1:
                raise ValueError("this model's chat template changes the message text; pass --no-chat")
            markup, rest = rest.split(mark)
            pieces.append(self.encode(markup, add_special_tokens=False))
        return pieces + [self.encode(rest, add_special_tokens=False)]

    def encode_chat(self, messages: list[dict], special_text: bool = False) -> list[int]:
        """The rendered conversation's ids. Only the template's own markup becomes special tokens: the
        messages' text is tokenized as plain text (a document cannot end the user's turn and write a system
        turn of its own), unless special_text."""
        markup = self.chat_markup(messages)
        ids = markup[0]
        for m, after in zip(messages, markup[1:]):
            ids = ids + self.encode(m["content"], add_special_tokens=False, special_text=special_text) + after
        return ids


def _token_text(tok):
    return tok.get("content") if isinstance(tok, dict) else tok


class StreamDecoder:
    """Turns a growing list of ids into text increments, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids, self.printed = tokenizer, [], 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character split over tokens: wait for the rest
            return ""
        new, self.printed = text[self.printed:], len(text)
        return new
