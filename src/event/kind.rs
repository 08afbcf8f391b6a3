//! What an event is, from its name: `EventKind`, its families and states.

/// The family an event name belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Family {
    /// `message.*`: messages sent through Comapi's One API, and inbound messages.
    Message,
    /// `interaction.*`: a recipient's interaction, such as a link click.
    Interaction,
    /// `conversationMessage.*`: messages in a conversation.
    ConversationMessage,
    /// `conversation.*`: conversations and their participants.
    Conversation,
    /// `profile.*`: profiles.
    Profile,
    /// `chat.*`: chats.
    Chat,
    /// `chatMessage.*`: messages in a chat.
    ChatMessage,
    /// A name this crate does not know.
    Unknown,
}

impl Family {
    /// A short stable name, used in store keys: `message`, `conversation`, ….
    #[cfg(feature = "redis")]
    #[must_use]
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Family::Message => "message",
            Family::Interaction => "interaction",
            Family::ConversationMessage => "conversationMessage",
            Family::Conversation => "conversation",
            Family::Profile => "profile",
            Family::Chat => "chat",
            Family::ChatMessage => "chatMessage",
            Family::Unknown => "unknown",
        }
    }
}

macro_rules! event_kinds {
    ($($name:literal => $kind:expr, $family:ident;)*) => {
        impl EventKind {
            /// The kind for an event name; [`EventKind::Unknown`] for a name this
            /// crate does not know.
            #[must_use]
            pub fn from_name(name: &str) -> EventKind {
                match name {
                    $($name => $kind,)*
                    _ => EventKind::Unknown,
                }
            }

            /// The event name Comapi uses for this kind; `None` for
            /// [`EventKind::Unknown`] (the event's own [`Event::name`](crate::Event::name) has it).
            #[must_use]
            pub fn as_name(self) -> Option<&'static str> {
                $(if self == $kind {
                    return Some($name);
                })*
                None
            }

            /// The family this kind belongs to.
            #[must_use]
            pub fn family(self) -> Family {
                $(if self == $kind {
                    return Family::$family;
                })*
                Family::Unknown
            }
        }

        #[cfg(test)]
        const ALL_NAMES: &[&str] = &[$($name),*];
    };
}

event_kinds! {
    "message.sent" => EventKind::Message(MessageStatus::Sent), Message;
    "message.delivered" => EventKind::Message(MessageStatus::Delivered), Message;
    "message.read" => EventKind::Message(MessageStatus::Read), Message;
    "message.expired" => EventKind::Message(MessageStatus::Expired), Message;
    "message.failed" => EventKind::Message(MessageStatus::Failed), Message;
    "message.inbound" => EventKind::MessageInbound, Message;
    "interaction.click" => EventKind::InteractionClick, Interaction;
    "conversationMessage.sent" => EventKind::ConversationMessage(ConversationMessageStatus::Sent), ConversationMessage;
    "conversationMessage.delivered" => EventKind::ConversationMessage(ConversationMessageStatus::Delivered), ConversationMessage;
    "conversationMessage.read" => EventKind::ConversationMessage(ConversationMessageStatus::Read), ConversationMessage;
    "conversation.create" => EventKind::Conversation(ConversationAction::Create), Conversation;
    "conversation.delete" => EventKind::Conversation(ConversationAction::Delete), Conversation;
    "conversation.undelete" => EventKind::Conversation(ConversationAction::Undelete), Conversation;
    "conversation.update" => EventKind::Conversation(ConversationAction::Update), Conversation;
    "conversation.participantAdded" => EventKind::Conversation(ConversationAction::ParticipantAdded), Conversation;
    "conversation.participantRemoved" => EventKind::Conversation(ConversationAction::ParticipantRemoved), Conversation;
    "conversation.participantTyping" => EventKind::Conversation(ConversationAction::ParticipantTyping), Conversation;
    "conversation.participantTypingOff" => EventKind::Conversation(ConversationAction::ParticipantTypingOff), Conversation;
    "profile.create" => EventKind::Profile(ProfileAction::Create), Profile;
    "profile.update" => EventKind::Profile(ProfileAction::Update), Profile;
    "profile.delete" => EventKind::Profile(ProfileAction::Delete), Profile;
    "profile.undelete" => EventKind::Profile(ProfileAction::Undelete), Profile;
    "profile.devicesUpdated" => EventKind::Profile(ProfileAction::DevicesUpdated), Profile;
    "chat.create" => EventKind::Chat(ChatAction::Create), Chat;
    "chat.channelUpdated" => EventKind::Chat(ChatAction::ChannelUpdated), Chat;
    "chat.closed" => EventKind::Chat(ChatAction::Closed), Chat;
    "chat.delete" => EventKind::Chat(ChatAction::Delete), Chat;
    "chatMessage.sent" => EventKind::ChatMessageSent, ChatMessage;
}

/// What an event is, from its name. Match on it to dispatch; a name this crate does
/// not know is [`EventKind::Unknown`] and the event is still delivered, with its raw
/// name ([`Event::name`](crate::Event::name)) and payload ([`Event::payload_json`](crate::Event::payload_json)).
///
/// ```
/// use comapi_webhook::EventKind;
/// use comapi_webhook::event::MessageStatus;
/// assert_eq!(EventKind::from_name("message.read"), EventKind::Message(MessageStatus::Read));
/// assert_eq!(EventKind::from_name("message.teleported"), EventKind::Unknown);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EventKind {
    /// `message.sent`, `message.delivered`, `message.read`, `message.expired`,
    /// `message.failed`.
    Message(MessageStatus),
    /// `message.inbound`: a message from one of your contacts.
    MessageInbound,
    /// `interaction.click`: a tracked link was clicked.
    InteractionClick,
    /// `conversationMessage.sent`, `.delivered`, `.read`.
    ConversationMessage(ConversationMessageStatus),
    /// `conversation.create`, `.update`, `.delete`, `.undelete`, `.participantAdded`,
    /// `.participantRemoved`, `.participantTyping`, `.participantTypingOff`.
    Conversation(ConversationAction),
    /// `profile.create`, `.update`, `.delete`, `.undelete`, `.devicesUpdated`.
    Profile(ProfileAction),
    /// `chat.create`, `.channelUpdated`, `.closed`, `.delete`.
    Chat(ChatAction),
    /// `chatMessage.sent`.
    ChatMessageSent,
    /// Any other name: the fallback that keeps the event instead of failing it.
    Unknown,
}

/// The state a `message.*` event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MessageStatus {
    /// `message.sent`
    Sent,
    /// `message.delivered`
    Delivered,
    /// `message.read`
    Read,
    /// `message.expired`
    Expired,
    /// `message.failed`
    Failed,
}

/// The state a `conversationMessage.*` event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ConversationMessageStatus {
    /// `conversationMessage.sent`
    Sent,
    /// `conversationMessage.delivered`
    Delivered,
    /// `conversationMessage.read`
    Read,
}

/// What happened to a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ConversationAction {
    /// `conversation.create`
    Create,
    /// `conversation.delete`
    Delete,
    /// `conversation.undelete`
    Undelete,
    /// `conversation.update`
    Update,
    /// `conversation.participantAdded`
    ParticipantAdded,
    /// `conversation.participantRemoved`
    ParticipantRemoved,
    /// `conversation.participantTyping`
    ParticipantTyping,
    /// `conversation.participantTypingOff`
    ParticipantTypingOff,
}

/// What happened to a profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ProfileAction {
    /// `profile.create`
    Create,
    /// `profile.update`
    Update,
    /// `profile.delete`
    Delete,
    /// `profile.undelete`
    Undelete,
    /// `profile.devicesUpdated`
    DevicesUpdated,
}

/// What happened to a chat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ChatAction {
    /// `chat.create`
    Create,
    /// `chat.channelUpdated`
    ChannelUpdated,
    /// `chat.closed`
    Closed,
    /// `chat.delete`
    Delete,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_round_trips_through_its_kind() {
        for name in ALL_NAMES {
            let kind = EventKind::from_name(name);
            assert_ne!(kind, EventKind::Unknown, "{name}");
            assert_eq!(kind.as_name(), Some(*name));
            assert_ne!(kind.family(), Family::Unknown, "{name}");
        }
        assert_eq!(EventKind::Unknown.as_name(), None);
        assert_eq!(EventKind::Unknown.family(), Family::Unknown);
    }
}
