"""MOSS real-time stream grammar: special tokens, the system prompt and turn layout.

Pure module (no torch, no rclpy). Source: docs/model.md sections 5.1-5.4.
"""
#: The real-time system prompt, byte-exact (docs/model.md section 5.3).
REALTIME_SYSTEM_PROMPT = (
    'You are a helpful AI assistant. You perceive and understand the surrounding environment in real-time through the camera and interact with the user. Whether or not the user actively asks questions, you continuously observe and analyze visual information, maintaining awareness of the environment.\n'
    '\n'
    'Core Abilities:\n'
    '- Continuous Perception: Always observe and analyze the visual information captured by the camera in real-time. This perception does not stop even when there is no user interaction.\n'
    '- Observation-Based Answers: All answers must be based on visual observations, including both historical and real-time data. Do not make guesses without evidence from visual input.\n'
    "- Dynamic Adjustment: When you observe changes relevant to the user's question, promptly update and adjust your answers to ensure timeliness and accuracy.\n"
    '\n'
    'Interaction Rules:\n'
    '- Always base your answers on observed visual information.\n'
    "- If you notice significant changes related to the user's question, proactively and promptly update your answer.\n"
    '- When you are unable to answer or have finished answering, output `<|silence|>` directly.\n'
    '\n'
    'Your goal is to be the user\'s reliable "eyes", helping them understand and perceive the world around them.'
)

#: UTF-8 sha256 of :data:`REALTIME_SYSTEM_PROMPT` as the training data has it (checked by
#: ``test_dialogue.py``; docs/model.md section 5.3).
REALTIME_SYSTEM_PROMPT_SHA256 = '4fa69862e0cae1329957a85dbbee2c69d1b66e745bcdbb0a91baece6524f2327'

#: Special-token names resolved by name in the tokenizer (docs/model.md section 5.1).
BOS = '<|begin_of_text|>'
START_HEADER = '<|start_header_id|>'
END_HEADER = '<|end_header_id|>'
EOT = '<|eot_id|>'
SILENCE = '<|silence|>'
ELLIPSIS = '<|...|>'
VIDEO = '<|video|>'
IMAGE = '<|image|>'

REQUIRED_SPECIAL_TOKENS = (BOS, START_HEADER, END_HEADER, EOT, SILENCE, ELLIPSIS, VIDEO, IMAGE)


def header_text(role: str) -> str:
    """Text of one role header: ``<|start_header_id|>role<|end_header_id|>`` + blank line.

    Source: docs/model.md section 5.2 (LlamaFactory ``mllama`` template).
    """
    return f'{START_HEADER}{role}{END_HEADER}\n\n'


def session_start_text(system_prompt: str = REALTIME_SYSTEM_PROMPT) -> str:
    """Session prefix: BOS, system block, empty user turn, assistant header (section 7.4 step 1)."""
    return (BOS + header_text('system') + system_prompt + EOT
            + header_text('user') + EOT + header_text('assistant'))


def question_text(question: str, close_assistant_turn: bool = True) -> str:
    """Text that inserts a user question mid-stream (section 7.4 step 5).

    :param question: the user's question, already validated.
    :param close_assistant_turn: prepend ``<|eot_id|>`` closing the running assistant turn.
    """
    prefix = EOT if close_assistant_turn else ''
    return prefix + header_text('user') + question + EOT + header_text('assistant')
