"""``POST /tokenize`` and ``POST /detokenize`` (vLLM's, shapes in deploy/protocol/tokenize.py) with the ingress
tokenizer: ``count`` equals ``usage.prompt_tokens`` of a generation request with the same prompt or messages
(same tokenizer, same chat template). A ``model``, when given, must be the served name (404). A prompt far
beyond the context is refused before tokenizing (400 ``context_length_exceeded``, as for generation); one
that merely exceeds ``max_model_len`` is tokenized and counted (that is what clients ask /tokenize for).
Detokenize refuses ids at or above a real tokenizer's size (400); the simulated one decodes any id (U+FFFD).
"""

from halffull.deploy.protocol.chat import ChatCompletionRequest
from halffull.deploy.protocol.errors import bad
from halffull.deploy.protocol.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)
from halffull.deploy.serving import check_text_size, chat_prompt_ids, check_model


class TokenizeServing:
    def __init__(self, tokenizer, *, model: str, max_model_len: int):
        self.tokenizer, self.model, self.max_model_len = tokenizer, model, max_model_len

    def tokenize(self, body: TokenizeCompletionRequest | TokenizeChatRequest) -> TokenizeResponse:
        if body.model is not None:
            check_model(body.model, self.model)
        if isinstance(body, TokenizeChatRequest):
            chat = ChatCompletionRequest.model_construct(messages=body.messages)
            ids = chat_prompt_ids(chat, self.tokenizer, self.max_model_len)
        else:
            check_text_size(len(body.prompt), self.max_model_len, "prompt", self.tokenizer)
            ids = self.tokenizer.encode(body.prompt)
        return TokenizeResponse(count=len(ids), max_model_len=self.max_model_len, tokens=list(ids))

    def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        if body.model is not None:
            check_model(body.model, self.model)
        limit = getattr(self.tokenizer, "vocab_limit", None)  # a real tokenizer has no text for larger ids
        if limit is not None and not all(t < limit for t in body.tokens):
            raise bad(f"'tokens' must be token ids in [0, {limit})", "tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(body.tokens))
