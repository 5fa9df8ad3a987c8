"""A small list server behind Postfix: LMTP with one answer per recipient.

Postfix hands it every message for the list domain over a unix socket::

    # main.cf
    virtual_mailbox_domains = lists.example.com
    virtual_transport = lmtp:unix:/run/minismtp/lmtp.sock

    $ minismtp run examples.lmtp_lists:app --lmtp --unix /run/minismtp/lmtp.sock --unix-mode 0660

A message to several lists gets an answer per list after its content: delivered to the open
list, refused for a list that does not exist and for a members-only list its sender is not a
member of. Postfix then delivers, or bounces to the sender, recipient by recipient.
"""

from minismtp import App, Reply

#: Each list and who may post to it (None: anyone).
LISTS: dict[str, set[str] | None] = {
    "announce": {"owner@example.com"},
    "dev": None,
}

NO_SUCH_LIST = Reply(550, "5.1.1", "No such list")
MEMBERS_ONLY = Reply(550, "5.7.1", "Only members may post to this list")

app = App(hostname="lists.example.com")


@app.on_data
def per_list(tx, message):
    """Decide for each recipient (a list) on its own; the ones left out are delivered."""
    sender = str(tx.mail_from).lower()
    outcomes = {}
    for rcpt in tx.rcpt_to:
        name = rcpt.local_part.lower()
        if name not in LISTS:
            outcomes[rcpt] = NO_SUCH_LIST
        elif LISTS[name] is not None and sender not in LISTS[name]:
            outcomes[rcpt] = MEMBERS_ONLY
    return outcomes


@app.on_message
def distribute(message):
    # message.rcpt_to holds only the lists that took the message.
    for rcpt in message.rcpt_to:
        print(f"list {rcpt.local_part}: message {message.id} from <{message.mail_from}>")
