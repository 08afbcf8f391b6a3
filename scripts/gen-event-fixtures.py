#!/usr/bin/env python3
"""Writes the event fixtures under tests/fixtures/events, tests/fixtures/drifted (signed
bodies whose fields drifted from the documented types: stored whole, and only a typed read
of the drifted part fails) and tests/fixtures/invalid (bodies that earn a 400).

Deterministic: run it again and nothing changes. message_sent_sms.json is Comapi's
documented example, verbatim; the others follow the same envelope.
"""
import copy
import json
import pathlib
import uuid

ROOT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures"
EVENTS = ROOT / "events"
INVALID = ROOT / "invalid"
DRIFTED = ROOT / "drifted"

DOCUMENTED = (
    '{"eventId":"0dceaf0d-93ea-4314-a6f8-b0cffe69799a","accountId":1234,"apiSpaceId":"c924cf6e-4352-4b26-a71a-c2032bea7a01",'
    '"name":"message.sent","payload":{"details":{"channel":"sms","additionalInfo":{"to":"447123123123","successful":true,'
    '"clientRef":"e9f154c8-4011-493f-bb73-09cfcf8a1411"},"channelStatus":{"sms":{"status":"sent","details":{"to":"447123123123",'
    '"successful":true,"clientRef":"e9f154c8-4011-493f-bb73-09cfcf8a1411"},"updatedOn":"2017-08-31T09:26:14.798Z"}}},'
    '"channelData":{"sms":{"phoneNumberCountryCode":"GB","segmentCount":1}},"updatedOn":"2017-08-31T09:26:14.799Z",'
    '"metadata":{"data":"My correlation data"},"id":"e9f154c8-4011-493f-bb73-09cfcf8a1411"},"revision":2,'
    '"etag":"\\"2e-PLB2C6w/yVdPjUhuRiZtlvt8k0Q\\"","timestamp":"2017-08-31T09:26:14.604Z"}'
)
API_SPACE = "c924cf6e-4352-4b26-a71a-c2032bea7a01"
MESSAGE_ID = "e9f154c8-4011-493f-bb73-09cfcf8a1411"


def uid(n):
    return str(uuid.UUID(int=0x5EED_0000_0000_4000_8000_0000_0000_0000 + n))


def envelope(n, name, payload, revision=None, etag=None, ts="2017-08-31T09:26:14.604Z"):
    e = {"eventId": uid(n), "accountId": 1234, "apiSpaceId": API_SPACE, "name": name, "payload": payload}
    if revision is not None:
        e["revision"] = revision
    if etag is not None:
        e["etag"] = etag
    e["timestamp"] = ts
    return e


def message_state(n, status, revision):
    base = json.loads(DOCUMENTED)["payload"]
    payload = copy.deepcopy(base)
    payload["details"]["channelStatus"]["sms"]["status"] = status
    if status == "failed":
        payload["details"]["additionalInfo"]["successful"] = False
        payload["details"]["channelStatus"]["sms"]["details"]["error"] = "Recipient unreachable"
    return envelope(n, f"message.{status}", payload, revision, f'"{revision}e-state-{status}"')


def write(folder, name, obj_or_text):
    text = obj_or_text if isinstance(obj_or_text, str) else json.dumps(obj_or_text, ensure_ascii=False, separators=(",", ":"))
    (folder / name).write_text(text, encoding="utf-8")


def main():
    EVENTS.mkdir(parents=True, exist_ok=True)
    INVALID.mkdir(parents=True, exist_ok=True)
    DRIFTED.mkdir(parents=True, exist_ok=True)
    write(EVENTS, "message_sent_sms.json", DOCUMENTED)
    for i, status in enumerate(["delivered", "read", "expired", "failed"], start=3):
        write(EVENTS, f"message_{status}.json", message_state(i, status, i))
    write(EVENTS, "message_inbound.json", envelope(10, "message.inbound", {
        "id": "5f8c3f0e-8a3b-4f43-9d2b-2b7f1c0e6a11", "channel": "sms",
        "from": {"phoneNumber": "447123123123", "profileId": "alex@example.com"},
        "to": {"phoneNumber": "447000000001"}, "body": "Yes please, book me in for Tuesday",
        "updatedOn": "2017-08-31T10:01:02.000Z",
    }, revision=1))
    write(EVENTS, "conversation_message_delivered.json", envelope(11, "conversationMessage.delivered", {
        "messageId": "a3c2e8c1-2f7d-4b1e-9a53-6b0f3d8e2c44", "conversationId": "support-1234",
        "profileId": "alex@example.com", "timestamp": "2017-08-31T10:05:00.000Z",
    }, revision=2))
    write(EVENTS, "conversation_create.json", envelope(12, "conversation.create", {
        "id": "support-1234", "name": "Support", "description": "Alex's support chat",
        "roles": {"owner": {"canSend": True}, "participant": {"canSend": True}}, "isPublic": False,
    }))
    write(EVENTS, "profile_update.json", envelope(13, "profile.update", {
        "id": "alex@example.com", "email": "alex@example.com", "phoneNumber": "447123123123",
    }, revision=7, etag='"7-abc"'))
    unknown = envelope(14, "message.teleported", {"id": MESSAGE_ID, "destination": {"planet": "Mars", "eta": 3.5e9}},
                       revision=9)
    unknown["region"] = "eu-west"
    unknown["trace"] = {"spans": [1, 2, 3], "sampled": True}
    unknown["payload"]["future"] = [None, True, {"nested": []}]
    write(EVENTS, "unknown_event.json", unknown)
    meta = json.loads(DOCUMENTED)
    meta["eventId"] = uid(15)
    meta["payload"]["metadata"] = {"note": "Grüße aus Köln — 東京 📱", "quote": "she said \"hi\"\n"}
    write(EVENTS, "non_ascii_metadata.json", meta)
    batch = [dict(json.loads(DOCUMENTED), eventId=uid(1000 + i), revision=i % 5 + 1) for i in range(500)]
    write(EVENTS, "batch_500.json", batch)

    write(INVALID, "not_json.txt", "this is not JSON {")
    write(INVALID, "not_an_envelope.json", {"hello": "world"})
    no_id = json.loads(DOCUMENTED)
    del no_id["eventId"]
    write(INVALID, "missing_event_id.json", no_id)
    deep = json.loads(DOCUMENTED)
    deep["payload"]["details"]["channelStatus"]["sms"]["status"] = 42
    write(DRIFTED, "wrong_type_deep.json", deep)
    bad_batch = [dict(json.loads(DOCUMENTED), eventId=uid(2000 + i)) for i in range(5)]
    bad_batch[3]["payload"]["id"] = 12345
    write(DRIFTED, "batch_one_bad.json", bad_batch)
    drifted = [dict(json.loads(DOCUMENTED), eventId=uid(3000 + i)) for i in range(6)]
    drifted[0]["payload"]["details"]["channel"] = 7
    drifted[1]["revision"] = 5.5
    drifted[2]["apiSpaceId"] = 123
    drifted[3]["etag"] = {"weak": True}
    drifted[4]["payload"] = "not an object"
    del drifted[5]["payload"]
    write(DRIFTED, "batch_drifted.json", drifted)
    write(INVALID, "bare_string.json", '"message.sent"')
    write(INVALID, "number.json", "42")
    write(INVALID, "nested_10000.json", "[" * 10000 + "]" * 10000)


if __name__ == "__main__":
    main()
