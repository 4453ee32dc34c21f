"""Baseline: the smallest WebSocket proxy to an OpenAI-compatible stream, with none of the site's features.

No database, no auth, no channel layer, no coalescing: receive a `send` frame,
stream the model's reply back as `chunk` frames (the site's protocol shapes, so
the load generator drives both alike), then `done`. One shared AsyncOpenAI.

    OPENAI_BASE_URL=http://127.0.0.1:PORT/v1 uvicorn bench.fastapi_proxy:app --port 8001
"""

import os
import uuid

import openai
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

app = FastAPI()
client = openai.AsyncOpenAI(base_url=os.environ["OPENAI_BASE_URL"], api_key="not-needed", max_retries=0)


@app.websocket("/ws/chat/")
async def chat(ws: WebSocket) -> None:
    await ws.accept()
    try:
        while True:
            frame = await ws.receive_json()
            reply_id = str(uuid.uuid4())
            await ws.send_json({"type": "ack", "client_id": frame["client_id"], "assistant_message_id": reply_id})
            stream = await client.chat.completions.create(
                model="test-model", messages=[{"role": "user", "content": frame["content"]}], stream=True
            )
            offset = 0
            async for event in stream:
                for choice in event.choices:
                    if choice.delta.content:
                        delta = choice.delta.content
                        await ws.send_json({"type": "chunk", "message_id": reply_id, "offset": offset, "delta": delta})
                        offset += len(delta)
            await ws.send_json({"type": "done", "message_id": reply_id, "status": "complete", "error": None})
    except WebSocketDisconnect:
        pass
