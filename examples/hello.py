from minismtp import App, Reply

app = App(hostname="mx.example.com")

@app.on_rcpt
async def only_example_com(tx, rcpt):
    if rcpt.domain != "example.com":
        return Reply(550, "5.7.1", "Relay access denied")
    # returning None accepts with the default 250 2.1.5

@app.on_message
async def show(message):
    print(message.id, message.mail_from, *message.rcpt_to, len(message.data))
